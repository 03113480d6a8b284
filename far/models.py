"""The base model: the embedded tiny Stable Diffusion built from code, or a real one resolved and verified.

Every later stage loads `models/base` with `StableDiffusionPipeline.from_pretrained`, whichever it is,
so the tiny default exercises exactly the code path that loads `stabilityai/stable-diffusion-2-1-base`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from far.config import ModelConfig, TinyModelConfig
from far.errors import InvalidInputError
from far.io import atomic_dir, write_json
from far.tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer

SOURCE_FILE = "far_base.json"  # what was built or resolved, written beside the model
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Only what a StableDiffusionPipeline needs: no fp16/ema variants, no .bin duplicates, no safety checker.
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "*/config.json",
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]


class BaseModelError(InvalidInputError):
    """The configured base model could not be resolved or failed verification."""


def build_tiny_pipeline(cfg: TinyModelConfig, resolution: int, seed: int) -> StableDiffusionPipeline:
    """A randomly initialised, Stable-Diffusion-2-shaped pipeline small enough for 2 CPU cores.

    Same component classes as SD 2.1 (UNet2DConditionModel with cross-attention in all but the last
    level, an AutoencoderKL downsampling 2^(levels - 1)x (8x with the default 4 levels), a CLIPTextModel,
    the real CLIP tokenizer), only narrower and shallower. Each component is seeded on its own so changing
    one size leaves the others alone.
    """
    n_levels = len(cfg.unet_channels)
    latent_side = resolution // 2 ** (len(cfg.vae_channels) - 1)
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=cfg.text_hidden_size,
        intermediate_size=4 * cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=max(1, cfg.text_hidden_size // 32),
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=cfg.text_hidden_size,
        hidden_act="gelu",  # SD 2.x's OpenCLIP text tower uses gelu, not quick_gelu
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=latent_side,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n_levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_levels - 1),
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(16, min(cfg.unet_channels)),
        use_linear_projection=True,  # as in SD 2.x
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=tuple(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        layers_per_block=1,
        norm_num_groups=min(16, min(cfg.vae_channels)),
        sample_size=resolution,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=cfg.prediction_type,
    )
    tokenizer = build_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def vae_factor(vae) -> int:
    """Image pixels per latent cell: every AutoencoderKL encoder level but the last halves the image (SD: 8)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resolution_multiple(pipe) -> int:
    """Resolutions `pipe` runs at are multiples of this: the VAE factor times 2 per UNet down-sampling level."""
    return vae_factor(pipe.vae) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def check_resolution(pipe, resolution: int, where: Path | str) -> None:
    """Raise InvalidInputError naming `model.resolution` when the model loaded from `where` cannot run at it."""
    multiple = resolution_multiple(pipe)
    if resolution % multiple:
        raise InvalidInputError(
            f"model.resolution: {resolution} is invalid for the base model in {where}: must be a multiple of "
            f"{multiple} (its VAE downsamples {vae_factor(pipe.vae)}x and its UNet halves the latent "
            f"{len(pipe.unet.config.block_out_channels) - 1} times)"
        )


def resolve_pretrained(pretrained: str, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A local diffusers directory for `pretrained` (a path, or a Hub id fetched/found in the HF cache).

    Returns the directory and what was resolved (for the record). Raises BaseModelError naming the value.
    """
    local = Path(pretrained).expanduser()
    if local.exists():
        if not local.is_dir():
            raise BaseModelError(f"model.pretrained: {pretrained!r} is a file, expected a diffusers directory")
        return local.resolve(), {"source": "local", "path": str(local.resolve())}
    if pretrained.count("/") != 1 or pretrained.startswith((".", "/")):
        raise BaseModelError(
            f"model.pretrained: {pretrained!r} is neither 'tiny', 'world', an existing directory, "
            "nor a Hub id (org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        path = snapshot_download(
            pretrained, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline
        )
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hub"
        raise BaseModelError(
            f"model.pretrained: {pretrained!r} could not be found {where}: {exc.__class__.__name__}: {exc}. "
            "Use `model.pretrained: tiny` offline, or a local diffusers directory."
        ) from None
    return Path(path), {"source": "hub", "repo_id": pretrained, "revision": revision, "snapshot": Path(path).name}


def verify_diffusers_dir(path: Path) -> StableDiffusionPipeline:
    """Check that `path` holds a loadable Stable Diffusion pipeline and load it (on CPU, fp32)."""
    index = path / "model_index.json"
    if not index.is_file():
        raise BaseModelError(f"{path}: no model_index.json, not a diffusers pipeline directory")
    components = json.loads(index.read_text())
    missing = [c for c in REQUIRED_COMPONENTS if not components.get(c) or components[c][0] is None]
    missing += [c for c in REQUIRED_COMPONENTS if c not in missing and not (path / c).is_dir()]
    if missing:
        raise BaseModelError(f"{path}: missing pipeline components {missing} (need {list(REQUIRED_COMPONENTS)})")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    except Exception as exc:  # noqa: BLE001 - any load failure is reported with the directory named
        raise BaseModelError(f"{path}: not loadable as a StableDiffusionPipeline: {exc}") from exc
    if pipe.unet.config.cross_attention_dim != pipe.text_encoder.config.hidden_size:
        raise BaseModelError(
            f"{path}: unet.cross_attention_dim {pipe.unet.config.cross_attention_dim} != "
            f"text_encoder.hidden_size {pipe.text_encoder.config.hidden_size}"
        )
    return pipe


def _param_counts(pipe: StableDiffusionPipeline) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a resolved model into the output; hard links where possible (HF cache files are read-only)."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(os.path.realpath(s), d)
        except OSError:
            shutil.copy2(os.path.realpath(s), d)

    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)


def prepare_base_model(cfg: ModelConfig, out: Path) -> dict[str, Any]:
    """Build (tiny), install the shipped world model (world) or resolve + verify (anything else) into `out`, atomically.

    Writes `out/far_base.json` with what was used; returns that record. A non-tiny value is never
    replaced by the tiny model: it is used or the stage fails.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        if cfg.pretrained == "tiny":
            pipe = build_tiny_pipeline(cfg.tiny, cfg.resolution, cfg.seed)
            pipe.save_pretrained(tmp, safe_serialization=True)
            verified = verify_diffusers_dir(tmp)
            record: dict[str, Any] = {"source": "tiny", "seed": cfg.seed, "tiny": cfg.tiny.model_dump()}
        elif cfg.pretrained == "world":
            from far.world.weights import install_base

            record = install_base(tmp, cfg.resolution)  # hashes checked against MANIFEST.json first; fp16 -> fp32
            verified = verify_diffusers_dir(tmp)
        else:
            src, record = resolve_pretrained(cfg.pretrained, cfg.revision)
            verified = verify_diffusers_dir(src)  # errors name the user's directory, not our temporary one
            check_resolution(verified, cfg.resolution, src)
            _copy_tree(src, tmp)
            (tmp / SOURCE_FILE).unlink(missing_ok=True)
        record |= {
            "pretrained": cfg.pretrained,
            "resolution": cfg.resolution,
            "parameters": _param_counts(verified),
            "prediction_type": verified.scheduler.config.get("prediction_type", "epsilon"),
        }
        write_json(tmp / SOURCE_FILE, record)
    return record


def load_base_pipeline(path: Path | str, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load `models/base` (or any SD directory) the way every stage does."""
    pipe = StableDiffusionPipeline.from_pretrained(
        Path(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    # Cast after loading: the dtype keyword was renamed across diffusers versions (torch_dtype -> dtype).
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
