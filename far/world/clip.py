"""A tiny CLIP that has learned the world, so that CLIP-T and CLIP-I mean something there.

clip-anytorch's own `CLIP` class (a ViT image tower, a text transformer, the real 49408-token BPE), trained
contrastively (InfoNCE, learned temperature) on world scenes and captions, and saved as a fp16 state-dict
checkpoint that `clip.load` reads: the metrics load it through the same path as `eval.clip_model: ViT-B/32`.
Images are renders or their round trips through the world VAE (what generated images look like); captions
are full or with attributes dropped (`CaptionDropout`), so short prompts ("a dog") embed sensibly too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from far.io import atomic_file
from far.world.captions import CaptionDropout, with_article
from far.world.pretrain import progress
from far.world.render import Scene, render, sample_scene
from far.world.vocab import BACKGROUND_PHRASES, BACKGROUNDS, CLASSES, COLOUR_NAMES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipTrainConfig:
    seed: int = 2000
    scenes: int = 8000
    steps: int = 600
    batch_size: int = 96
    lr: float = 1e-3
    resolution: int = 64
    patch: int = 8
    width: int = 64  # clip-anytorch derives heads = width // 64
    layers: int = 2
    embed_dim: int = 64


def build_clip(cfg: ClipTrainConfig):  # noqa: ANN201 - clip.model.CLIP, imported lazily
    from clip.model import CLIP

    torch.manual_seed(cfg.seed)
    return CLIP(embed_dim=cfg.embed_dim, image_resolution=cfg.resolution, vision_layers=cfg.layers,
                vision_width=cfg.width, vision_patch_size=cfg.patch, context_length=77, vocab_size=49408,
                transformer_width=cfg.width, transformer_heads=cfg.width // 64, transformer_layers=cfg.layers)


def clip_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 at the model's resolution -> CLIP-normalised (B, 3, H, W), as clip.load's preprocess."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def train_clip(cfg: ClipTrainConfig, vae, log_every: int = 50):  # noqa: ANN201
    """Train the world CLIP from scratch; returns the model (fp32, eval mode)."""
    import clip

    from far.world.oracle_train import round_trip

    rng0 = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng0) for _ in range(cfg.scenes)]
    images = np.stack([render(s, cfg.resolution)[0] for s in scenes])
    trips = np.concatenate([round_trip(vae, images[i : i + 256]) for i in range(0, len(images), 256)])
    model = build_clip(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    dropout = CaptionDropout(body=0.1, part=0.3, pattern=0.3, background=0.2)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(scenes), cfg.batch_size, replace=False)
        use_trip = rng.random(cfg.batch_size) < 0.5
        batch = np.where(use_trip[:, None, None, None], trips[idx], images[idx])
        texts = [dropout(scenes[i], rng) for i in idx]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        img = F.normalize(model.encode_image(clip_input(batch)), dim=-1)
        txt = F.normalize(model.encode_text(clip.tokenize(texts)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        # Captions can repeat within a batch ("a dog"): every image whose caption is identical is a positive.
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.t().log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            progress("clip", step + 1, cfg.steps, 0, t0, loss=loss.item())
    return model.eval()


def save_clip(model, path: Path) -> None:
    """fp16 state dict, as OpenAI's checkpoints (clip.load casts through fp16 on load)."""
    with atomic_file(path) as tmp:
        torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp)


@torch.no_grad()
def zero_shot(model, scenes: list[Scene], images: np.ndarray) -> dict[str, float]:
    """Zero-shot accuracy on single-subject scenes: pick the best of the prompts that vary one field.

    class: "a {class}" over the classes; body colour: "a {colour} {class}" over the colours (class true);
    background: "a {class} {background phrase}" over the backgrounds (class true).
    """
    import clip

    def embed_text(texts: list[str]) -> torch.Tensor:
        return F.normalize(model.encode_text(clip.tokenize(texts)).float(), dim=-1)

    img = F.normalize(model.encode_image(clip_input(images)).float(), dim=-1)
    hits = {"class": 0, "body": 0, "background": 0}
    for k, s in enumerate(scenes):
        subj = s.subjects[0]
        options = {
            "class": ([f"a {c}" for c in CLASSES], CLASSES.index(subj.cls)),
            "body": ([with_article(f"{c} {subj.cls}") for c in COLOUR_NAMES], COLOUR_NAMES.index(subj.body)),
            "background": ([f"a {subj.cls} {BACKGROUND_PHRASES[b]}" for b in BACKGROUNDS],
                           BACKGROUNDS.index(s.background)),
        }
        for task, (texts, truth) in options.items():
            hits[task] += int((embed_text(texts) @ img[k]).argmax()) == truth
    return {k: v / len(scenes) for k, v in hits.items()} | {"images": len(scenes)}

