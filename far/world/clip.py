"""A tiny CLIP that has learned the world, so that CLIP-T and CLIP-I mean something there.

clip-anytorch's own `CLIP` class (a ViT image tower, a text transformer, the real 49408-token BPE), trained
contrastively (InfoNCE, learned temperature) on world scenes and captions, and saved as a fp16 state-dict
checkpoint that `clip.load` reads: the metrics load it through the same path as `eval.clip_model: ViT-B/32`.
Images are renders or their round trips through the world VAE (what generated images look like); captions
are full or with attributes dropped (`CaptionDropout`, more often than the base model's pretraining drops
them), so short prompts ("a dog", "a red dog": the zero-shot prompts, and the sample prompts' shape) embed
sensibly too.

Text-side hard negatives (as NegCLIP, Yuksekgonul et al. 2023): each caption is also written with one
subject's class swapped and with one subject's body colour swapped, under the same dropout; those captions
join the image-to-text softmax as negatives. In a random batch almost every negative already differs in
background or colour, so without them the class of a subject (a question of shape) is barely learned: the
first CLIP, trained without them on captions that almost never said only "a dog", read class at 36 %.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from far.io import atomic_file
from far.world.captions import CaptionDropout, with_article
from far.world.pretrain import progress
from far.world.render import Scene, Subject, render, sample_scene
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
    width: int = 64  # text tower; clip-anytorch derives heads = width // 64
    layers: int = 2
    # The image tower reads shapes and colours: 128 wide x 3 layers read class zero-shot at 97 % where 64 x 2 (the
    # text tower's size) read 91 % (README, "How good it is").
    vision_width: int = 128
    vision_layers: int = 3
    embed_dim: int = 64
    caption_dropout: CaptionDropout = CaptionDropout(body=0.3, part=0.5, pattern=0.5, background=0.5)
    hard_negatives: bool = True  # a class-swapped and a body-swapped caption per caption, as negatives
    # Per scene, the scene with one subject's body and part colours exchanged, rendered: an image-side negative
    # for the caption (and its caption a text-side one). A striped subject is almost half part colour, so only
    # images tell the image tower which of its two colours the caption calls its body.
    exchange_images: bool = False
    # Weight of a two-way choice per scene (`exchange_loss`): its image against its exchanged image for its
    # caption, its caption against the exchanged caption for its image. In the batch-wide softmax the exchanged
    # image is one candidate of 2B, so the one distinction the striped subjects need is a small part of the loss.
    exchange_weight: float = 0.0


def swapped(scene: Scene, rng: np.random.Generator, field: str) -> Scene:
    """The scene with one random subject's `field` ("cls" or "body") changed to another value; a new body
    colour is never the subject's part colour (the renderer forbids it). `field` "exchange": that subject's
    body and part colours exchanged."""
    k = int(rng.integers(len(scene.subjects)))
    s: Subject = scene.subjects[k]
    if field == "exchange":
        changed = replace(s, body=s.part, part=s.body)
    else:
        if field == "cls":
            options = [c for c in CLASSES if c != s.cls]
        else:
            options = [c for c in COLOUR_NAMES if c not in (s.body, s.part)]
        changed = replace(s, **{field: options[int(rng.integers(len(options)))]})
    return replace(scene, subjects=scene.subjects[:k] + (changed,) + scene.subjects[k + 1:])


class Captions(NamedTuple):
    texts: list[str]  # one per scene
    negatives: list[str]  # per scene, in order: class-swapped, body-swapped (hard_negatives), exchanged (exchange)
    exchanged: list[tuple[Scene, str]]  # per scene with `exchange`: the exchanged scene and its caption


def captions_with_negatives(scenes: list[Scene], dropout: CaptionDropout, rng: np.random.Generator,
                            hard_negatives: bool, exchange: bool = False) -> Captions:
    """One caption per scene, and its class-swapped and body-swapped versions (`hard_negatives`) and its
    body/part-exchanged version (`exchange`), each drawn with the same dropout as the caption (same seed,
    same draws), so that only the swap differs."""
    texts, negatives, exchanged = [], [], []
    fields = (("cls", "body") if hard_negatives else ()) + (("exchange",) if exchange else ())
    for scene in scenes:
        seed = int(rng.integers(2**63))
        texts.append(dropout(scene, np.random.default_rng(seed)))
        for field in fields:
            other = swapped(scene, rng, field)
            negatives.append(dropout(other, np.random.default_rng(seed)))
            if field == "exchange":
                exchanged.append((other, negatives[-1]))
    return Captions(texts, negatives, exchanged)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, neg: torch.Tensor, texts: list[str],
                     negatives: list[str], scale: torch.Tensor, neg_img: torch.Tensor | None = None,
                     neg_img_texts: list[str] = ()) -> torch.Tensor:
    """Symmetric InfoNCE over B images and B captions, unit embeddings img, txt (B, D); neg (N, D) are extra
    captions in the image-to-text direction only, neg_img (M, D) extra images (captioned `neg_img_texts`) in
    the text-to-image direction only. Every caption identical to an image's own is a positive for it
    (captions repeat: "a dog"; a body swap under dropped body colour is the caption itself), in both directions."""
    all_texts = texts + negatives
    logits = scale * img @ torch.cat([txt, neg]).t()  # (B, B + N)
    same = torch.tensor([[a == b for b in all_texts] for a in texts], dtype=torch.float32)
    i2t = torch.sum(-(same / same.sum(1, keepdim=True)) * logits.log_softmax(1), 1).mean()
    images = img if neg_img is None else torch.cat([img, neg_img])
    image_texts = texts + list(neg_img_texts)
    logits_t = scale * txt @ images.t()  # (B, B + M)
    same_t = torch.tensor([[a == b for b in image_texts] for a in texts], dtype=torch.float32)
    t2i = torch.sum(-(same_t / same_t.sum(1, keepdim=True)) * logits_t.log_softmax(1), 1).mean()
    return 0.5 * (i2t + t2i)


def exchange_loss(img: torch.Tensor, txt: torch.Tensor, ex_img: torch.Tensor, ex_txt: torch.Tensor,
                  texts: list[str], ex_texts: list[str], scale: torch.Tensor) -> torch.Tensor:
    """Mean two-way cross-entropy over B scenes, unit embeddings (B, D) each: image i must match caption i
    better than the exchanged caption i, and caption i image i better than the exchanged image i. Scenes whose
    exchanged caption is their caption (dropout removed both colours: nothing in the words tells them apart)
    are left out; 0 if none is left."""
    keep = torch.tensor([a != b for a, b in zip(texts, ex_texts, strict=True)])
    if not keep.any():
        return torch.zeros(())
    right = scale * (img * txt).sum(1)
    # -log softmax([right, wrong])[0] = softplus(wrong - right)
    wrong_text, wrong_image = scale * (img * ex_txt).sum(1), scale * (ex_img * txt).sum(1)
    both = F.softplus(wrong_text - right) + F.softplus(wrong_image - right)
    return both[keep].mean() / 2


def build_clip(cfg: ClipTrainConfig):  # noqa: ANN201 - clip.model.CLIP, imported lazily
    from clip.model import CLIP

    torch.manual_seed(cfg.seed)
    return CLIP(embed_dim=cfg.embed_dim, image_resolution=cfg.resolution, vision_layers=cfg.vision_layers,
                vision_width=cfg.vision_width, vision_patch_size=cfg.patch, context_length=77, vocab_size=49408,
                transformer_width=cfg.width, transformer_heads=cfg.width // 64, transformer_layers=cfg.layers)


def clip_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 at the model's resolution -> CLIP-normalised (B, 3, H, W), as clip.load's preprocess."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def train_clip(cfg: ClipTrainConfig, vae, log_every: int = 50, init: Path | None = None,  # noqa: ANN001
               checkpoint: Path | None = None, checkpoint_every: int = 100):  # noqa: ANN201
    """Train the world CLIP, from scratch or on from `init` (a checkpoint `save_clip` wrote, of cfg's sizes);
    returns the model (fp32, eval mode). With `checkpoint`, the model, optimiser and step are saved there every
    `checkpoint_every` steps and a run finds and resumes them: batches are drawn from (seed, step), so a
    resumed run ends with the weights of one that was never stopped."""
    import clip

    from far.world.oracle_train import round_trip

    if cfg.exchange_weight and not cfg.exchange_images:
        raise ValueError(f"clip exchange_weight {cfg.exchange_weight}: needs exchange_images (the exchanged scenes)")
    rng0 = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng0) for _ in range(cfg.scenes)]
    model = build_clip(cfg).train()
    if init is not None:
        load_init(model, init)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    start = resume(checkpoint, cfg, init, model, opt) if checkpoint is not None else 0
    images = np.stack([render(s, cfg.resolution)[0] for s in scenes])
    trips = np.concatenate([round_trip(vae, images[i : i + 256]) for i in range(0, len(images), 256)])
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(scenes), cfg.batch_size, replace=False)
        use_trip = rng.random(cfg.batch_size) < 0.5
        batch = np.where(use_trip[:, None, None, None], trips[idx], images[idx])
        caps = captions_with_negatives([scenes[i] for i in idx], cfg.caption_dropout, rng, cfg.hard_negatives,
                                       cfg.exchange_images)
        for g in opt.param_groups:
            # a float, not a numpy scalar: the optimiser state is checkpointed and read back with weights_only
            g["lr"] = float(cfg.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / cfg.steps)))
        if caps.exchanged:
            batch = np.concatenate([batch, exchanged_images([s for s, _ in caps.exchanged], use_trip, vae,
                                                            cfg.resolution)])
        embedded = F.normalize(model.encode_image(clip_input(batch)), dim=-1)
        img, neg_img = embedded[: cfg.batch_size], embedded[cfg.batch_size:]
        all_txt = F.normalize(model.encode_text(clip.tokenize(caps.texts + caps.negatives)), dim=-1)
        txt, neg_txt = all_txt[: len(caps.texts)], all_txt[len(caps.texts):]
        scale, ex_texts = model.logit_scale.exp().clamp(max=100), [c for _, c in caps.exchanged]
        loss = contrastive_loss(img, txt, neg_txt, caps.texts, caps.negatives, scale, neg_img, ex_texts)
        if cfg.exchange_weight:  # each scene's negatives end with its exchanged caption
            ex_txt = neg_txt.view(cfg.batch_size, -1, neg_txt.shape[-1])[:, -1]
            loss = loss + cfg.exchange_weight * exchange_loss(img, txt, neg_img, ex_txt, caps.texts, ex_texts, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            progress("clip", step + 1, cfg.steps, start, t0, loss=loss.item())
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(checkpoint, cfg, init, model, opt, step + 1)
    return model.eval()


def load_init(model, init: Path) -> None:  # noqa: ANN001
    """Loads a `save_clip` checkpoint into `model` (fp32); a checkpoint of other sizes is an error naming it."""
    state = torch.load(init, map_location="cpu", weights_only=True)
    own = model.state_dict()
    wrong = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    if wrong or set(state) - set(own):
        raise ValueError(f"{init}: not a world CLIP of this config's sizes (keys missing or of other shapes: "
                         f"{wrong[:3] or sorted(set(state) - set(own))[:3]}...)")
    model.load_state_dict({k: v.float() for k, v in state.items()})


def _run_key(cfg: ClipTrainConfig, init: Path | None) -> dict:
    return {"config": repr(cfg), "init": str(init) if init is not None else None}


def save_checkpoint(path: Path, cfg: ClipTrainConfig, init: Path | None, model, opt, step: int) -> None:  # noqa: ANN001
    with atomic_file(path) as tmp:
        torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict()} | _run_key(cfg, init), tmp)


def resume(path: Path, cfg: ClipTrainConfig, init: Path | None, model, opt) -> int:  # noqa: ANN001
    """The step to start from: that of the checkpoint at `path` (loaded into model and opt), or 0 if none.
    A checkpoint of another config or start is an error that names it: it is not silently overwritten."""
    if not path.is_file():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    key = _run_key(cfg, init)
    if {k: saved.get(k) for k in key} != key:
        raise ValueError(f"{path}: a checkpoint of another CLIP run ({saved.get('config')}, init "
                         f"{saved.get('init')}); move it away or choose another --out")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    print(f"[clip] resuming from {path} at step {saved['step']}/{cfg.steps}")
    return int(saved["step"])


def exchanged_images(scenes: list[Scene], use_trip: np.ndarray, vae, resolution: int) -> np.ndarray:  # noqa: ANN001
    """Renders of `scenes` (B, H, W, 3) uint8, round tripped through the VAE where `use_trip` (B,) says, as
    the images they are negatives for."""
    from far.world.oracle_train import round_trip

    images = np.stack([render(s, resolution)[0] for s in scenes])
    if use_trip.any():
        images[use_trip] = round_trip(vae, images[use_trip])
    return images


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

