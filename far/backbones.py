"""Metric backbones: CLIP through clip-anytorch, DINO through transformers, and their offline tiny stand-ins.

Real runs name real checkpoints: `eval.clip_model` is a clip-anytorch model name (`ViT-B/32`, the
DreamBooth/Custom Diffusion choice) or a local checkpoint file, loaded with `clip.load`; `eval.dino_model`
is a Hugging Face id (`facebook/dino-vits16`, DINO ViT-S/16) or a local directory, loaded with
`ViTModel.from_pretrained`. Offline, `tiny` builds a small randomly initialised model of the same classes
from code with a fixed seed, SAVES it (a clip-anytorch state-dict checkpoint; a `save_pretrained` ViT
directory) and loads it back through exactly those two calls, so the tiny default exercises the real
loading paths. Tiny backbones are rebuilt into a temporary directory on every run (they take well under a
second) and are byte-for-byte deterministic: their weight hash is recorded beside every metric. Scores
from them mean nothing about image quality and are labelled so everywhere.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from far.errors import InvalidInputError

TINY = "tiny"
WORLD = "world"
TINY_LABEL = "random weights, offline; NOT comparable to published scores"
CLIP_CKPT = "tiny_clip.pt"
DINO_DIR = "tiny_dino"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(InvalidInputError):
    """A configured metric backbone could not be found or loaded."""


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's state dict (names, dtypes, shapes, values): identifies the exact weights used."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ CLIP
def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """Save a tiny ViT CLIP (clip-anytorch's `CLIP` class) as a state-dict checkpoint `clip.load` reads.

    224 px input and 32 px patches like ViT-B/32, width 64 (clip-anytorch derives heads = width // 64),
    2 layers per tower, embedding size 64, the real 49408-token vocabulary and 77-token context. Stored in
    fp16 like OpenAI's checkpoints: `clip.load` casts through fp16 on load, so fp16 values round-trip exactly.
    """
    from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=64,
        image_resolution=224,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=2,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


@dataclass
class ClipBackbone:
    """A clip-anytorch model plus its preprocessing; embeddings are L2-normalised."""

    name: str  # label written next to every CLIP metric
    model: torch.nn.Module
    preprocess: T.Compose  # PIL -> (3, R, R): resize shortest side R bicubic, centre crop, CLIP mean/std
    device: torch.device
    sha256: str

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """(N, D) unit-norm image embeddings, float32 on CPU."""
        return _batched(images, batch_size, lambda ims: self.model.encode_image(
            to_batch(self.preprocess, ims).to(self.device)))

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, D) unit-norm text embeddings (EOT token, projected), float32 on CPU."""
        import clip

        return _batched(texts, batch_size, lambda ts: self.model.encode_text(
            clip.tokenize(ts, truncate=True).to(self.device)))


def load_clip(name: str, workdir: Path, device: torch.device, seed: int = 0) -> ClipBackbone:
    """`eval.clip_model` -> ClipBackbone. `tiny` is built into `workdir` and loaded with `clip.load` too."""
    import clip

    if name == TINY:
        path, label = build_tiny_clip(Path(workdir) / CLIP_CKPT, seed), f"tiny-clip (seed {seed}; {TINY_LABEL})"
        source = str(path)
    elif name == WORLD:  # the CLIP trained on the world (far/world/clip.py), shipped and hash-checked
        from far.world.paths import CLIP
        from far.world.weights import verified_path

        source, label = str(verified_path(CLIP.name)), "world-clip (trained on world scenes; meaningful there only)"
    else:
        if name not in clip.available_models() and not os.path.isfile(name):
            raise BackboneError(
                f"eval.clip_model: {name!r} is neither 'tiny', a clip-anytorch model name "
                f"{clip.available_models()} nor an existing checkpoint file"
            )
        source, label = name, f"clip {name}"
    try:
        with warnings.catch_warnings():  # clip.load probes the file with the deprecated torch.jit.load first
            warnings.simplefilter("ignore", FutureWarning)
            model, preprocess = clip.load(source, device=device, jit=False)
    except Exception as exc:  # noqa: BLE001 - download, unpickling or shape errors all mean "cannot use it"
        raise BackboneError(f"eval.clip_model: {name!r} could not be loaded by clip.load: {exc}") from exc
    backbone = ClipBackbone(label, model.float().eval(), preprocess, device, weights_sha256(model))
    backbone.embed_images([Image.new("RGB", (8, 8))])  # warm-up: lazy imports and kernels load here, not in timings
    return backbone


def clip_to_hf(model: torch.nn.Module):  # noqa: ANN201 - transformers.CLIPModel, imported lazily
    """The same weights as a `transformers.CLIPModel` (ViT CLIP only), e.g. to cross-check against torchmetrics.

    Parameter mapping as in transformers' `convert_clip_original_pytorch_to_hf.py`: the fused attention
    `in_proj` splits into q/k/v, `c_fc`/`c_proj` are `fc1`/`fc2`, and the two projections are transposed.
    """
    from transformers import CLIPConfig, CLIPModel

    sd = {k: v.float() for k, v in model.state_dict().items()}
    if "visual.proj" not in sd:
        raise ValueError("clip_to_hf: only ViT CLIP models are supported (no visual.proj)")
    t_width, v_width = sd["ln_final.weight"].shape[0], sd["visual.conv1.weight"].shape[0]
    n_text = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    n_vis = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=t_width, intermediate_size=4 * t_width,
            num_hidden_layers=n_text, num_attention_heads=max(1, t_width // 64),
            max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=v_width, intermediate_size=4 * v_width, num_hidden_layers=n_vis,
            num_attention_heads=max(1, v_width // 64), image_size=patch * grid, patch_size=patch,
            hidden_act="quick_gelu",
        ),
        projection_dim=sd["text_projection"].shape[1],
    )
    out: dict[str, torch.Tensor] = {
        "logit_scale": sd["logit_scale"],
        "text_projection.weight": sd["text_projection"].T,
        "visual_projection.weight": sd["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
    }
    for src, dst, n in (("transformer", "text_model", n_text), ("visual.transformer", "vision_model", n_vis)):
        for i in range(n):
            s, d = f"{src}.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
            for part, w in zip("qkv", sd[s + "attn.in_proj_weight"].chunk(3), strict=True):
                out[d + f"self_attn.{part}_proj.weight"] = w
            for part, b in zip("qkv", sd[s + "attn.in_proj_bias"].chunk(3), strict=True):
                out[d + f"self_attn.{part}_proj.bias"] = b
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[d + b + ".weight"], out[d + b + ".bias"] = sd[s + a + ".weight"], sd[s + a + ".bias"]
    hf = CLIPModel(config).eval()
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"clip_to_hf: missing {missing}, unexpected {unexpected}")
    return hf


# ------------------------------------------------------------------------------------------------ DINO
def dino_preprocess() -> T.Compose:
    """DreamBooth / Custom Diffusion DINO evaluation: resize 256 (bicubic), centre crop 224, ImageNet mean/std."""
    return T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_tiny_dino(directory: Path, seed: int = 0) -> Path:
    """Save a tiny DINO-shaped ViT (16 px patches, 224 px, LayerNorm eps 1e-6 like ViT-S/16) with save_pretrained."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        image_size=224, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True,
    )
    torch.manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(directory)  # safetensors, as real checkpoints on the Hub
    return Path(directory)


@dataclass
class DinoBackbone:
    """A transformers ViTModel; the embedding is the final CLS token (as DINO's own `model(x)` returns)."""

    name: str
    model: torch.nn.Module
    preprocess: T.Compose
    device: torch.device
    sha256: str

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """(N, D) unit-norm CLS embeddings, float32 on CPU."""
        return _batched(images, batch_size, lambda ims: self.model(
            pixel_values=to_batch(self.preprocess, ims).to(self.device)
        ).last_hidden_state[:, 0])


def load_dino(name: str, workdir: Path, device: torch.device, seed: int = 0) -> DinoBackbone:
    """`eval.dino_model` -> DinoBackbone. `tiny` is built into `workdir` and loaded with from_pretrained too."""
    from transformers import ViTModel
    from transformers.utils import logging as hf_logging

    from far.progress import quiet

    if quiet():  # "Loading weights" bars are noise in DVC / CI logs
        hf_logging.disable_progress_bar()
    if name == TINY:
        source, label = build_tiny_dino(Path(workdir) / DINO_DIR, seed), f"tiny-dino-vit (seed {seed}; {TINY_LABEL})"
    else:
        source, label = name, f"dino {name}"
    try:
        model = ViTModel.from_pretrained(source, add_pooling_layer=False)
    except Exception as exc:  # noqa: BLE001 - offline cache miss, bad directory, wrong architecture
        raise BackboneError(
            f"eval.dino_model: {name!r} could not be loaded with ViTModel.from_pretrained "
            f"(an HF id such as facebook/dino-vits16, in the local cache when offline, or a local directory): {exc}"
        ) from exc
    model = model.float().eval().to(device)
    backbone = DinoBackbone(label, model, dino_preprocess(), device, weights_sha256(model))
    backbone.embed_images([Image.new("RGB", (8, 8))])  # warm-up, as for CLIP
    return backbone


def to_batch(preprocess: T.Compose, images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, R, R) float batch: `preprocess` applied to every image, with identical values.

    The PIL steps (resize, crop, RGB) run per image; ToTensor's /255 and Normalize run once on the stacked
    uint8 batch (the same arithmetic, elementwise), which saves ~5 small tensor ops per image.
    """
    steps = list(preprocess.transforms)
    kinds = [type(t) for t in steps[-2:]]
    if kinds != [T.ToTensor, T.Normalize]:
        return torch.stack([preprocess(im) for im in images])  # an unusual pipeline: apply it as it is
    pil = [T.Compose(steps[:-2])(im) for im in images]
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in pil])  # (B, R, R, 3)
    batch = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(255)  # as ToTensor
    return steps[-1](batch)  # Normalize broadcasts over (B, C, H, W)


def _batched(items: list, batch_size: int, fn) -> torch.Tensor:  # noqa: ANN001 - fn: list -> (B, D) tensor
    """Apply `fn` to consecutive batches, concatenate, L2-normalise rows. Empty input -> (0, 0)."""
    if not items:
        return torch.zeros(0, 0)
    out = [fn(items[i : i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def pick_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; otherwise the named device."""
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto"
                                                                                        else device))
