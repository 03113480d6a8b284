"""The world's text-to-image model: Stable Diffusion's component classes, sized for 64 px on a CPU.

Same classes as SD 2.1 (AutoencoderKL, UNet2DConditionModel with cross-attention, CLIPTextModel, the real
CLIP tokenizer, a DDIM scheduler), so `StableDiffusionPipeline.from_pretrained` loads and samples it and
every stage treats it like the real model. The sizes are ours, chosen by measuring (README, "The world"):
- a 4x VAE (3 levels): 64 px images become 16 x 16 x 4 latents;
- the UNet's 16 x 16 level is convolutional only: self-attention over 256 tokens at batch 32 cost ~90 ms
  forward + backward per layer here, more than the rest of the level; cross- and self-attention live at
  8 x 8 and 4 x 4, with 32-dim heads (diffusers reads `attention_head_dim` as the number of heads, so it
  is given per level as channels // 32: fewer, wider heads were fastest in SDPA here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from far.tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer

HEAD_DIM = 32


@dataclass(frozen=True)
class WorldModelConfig:
    resolution: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: 4x downsampling
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_attention: tuple[bool, ...] = (False, True, True)  # per level: cross-attention blocks or plain convs
    text_hidden_size: int = 64
    text_layers: int = 3

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> WorldModelConfig:
        return WorldModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_vae(cfg: WorldModelConfig, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.vae_channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=16, sample_size=cfg.resolution,
    )


def vae_factor(cfg: WorldModelConfig) -> int:
    return 2 ** (len(cfg.vae_channels) - 1)


def build_text_encoder(cfg: WorldModelConfig, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cfg.text_hidden_size, intermediate_size=4 * cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_hidden_size // HEAD_DIM),
        max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=cfg.text_hidden_size, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    ))


def build_unet(cfg: WorldModelConfig, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_attention))
    return UNet2DConditionModel(
        sample_size=cfg.resolution // vae_factor(cfg), in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, layers_per_block=1, block_out_channels=cfg.unet_channels,
        down_block_types=down, up_block_types=up, cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=tuple(max(1, c // HEAD_DIM) for c in cfg.unet_channels),
        norm_num_groups=16, use_linear_projection=True,
    )


def build_scheduler() -> DDIMScheduler:
    """SD 2.1-base's noise schedule (scaled linear, 1000 steps, epsilon prediction)."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=build_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
