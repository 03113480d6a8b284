"""`far world decoder`: fine-tune the world VAE's decoder so that small parts keep their colours.

The pretraining's VAE (1,200 steps of plain L1 + MSE) smears a subject's part (ears, wheels, a handle: a few
pixels across) and its stripes into the body colour, and every reader of pixels pays for it: the oracle read
part colour on round trips at 88 % against 98.6 % on renders. The encoder is frozen here, so the latent space,
and with it the UNet and text encoder trained on it, is unchanged; only `post_quant_conv` and the decoder
learn. The loss is L1 + MSE per pixel, weighted up where a subject is drawn and more where its part colour is
(parts and pattern: `render.coverage`), the pixels whose colours captions name and the oracle reads.

Randomness comes from (seed, step), never carried, and the state is checkpointed, so a killed run resumes
to the weights an uninterrupted one reaches.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from far.world.pretrain import _save_state, progress, resume_state, to_tensor
from far.world.render import coverage, render, sample_scene


@dataclass(frozen=True)
class DecoderTuneConfig:
    seed: int = 3000  # scenes from seeds no other trainer uses (pool 0, oracle 1000, held-out 1500, CLIP 2000)
    scenes: int = 6000
    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    subject_weight: float = 2.0  # extra loss weight on a fully covered subject pixel (background: 1)
    accent_weight: float = 8.0  # and on top of it, on a pixel fully in the part colour
    resolution: int = 64
    checkpoint_every: int = 250
    log_every: int = 50

    def to_dict(self) -> dict:
        return asdict(self)


def _trainable(vae) -> list[torch.nn.Parameter]:  # noqa: ANN001 - diffusers AutoencoderKL
    return list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())


def training_set(cfg: DecoderTuneConfig, vae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Rendered scenes and what the frozen encoder makes of them.

    Returns images (N, 3, H, W) in [-1, 1], loss weights (N, 1, H, W), and the posterior's mean and std
    (N, C, H/f, W/f) each, so a step samples a latent without running the encoder again.
    """
    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng) for _ in range(cfg.scenes)]
    images = np.stack([render(s, cfg.resolution)[0] for s in scenes])
    cover = [coverage(s, cfg.resolution) for s in scenes]
    weights = np.stack([1.0 + cfg.subject_weight * sub + cfg.accent_weight * acc for sub, acc in cover])
    x = to_tensor(images)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), 256):
            posterior = vae.encode(x[i : i + 256]).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return x, torch.from_numpy(weights.astype(np.float32))[:, None], torch.cat(means), torch.cat(stds)


def weighted_loss(recon: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-pixel L1 + MSE, weighted; recon, target (B, 3, H, W), weight (B, 1, H, W)."""
    diff = recon - target
    return (diff.abs() * weight).mean() + (diff.square() * weight).mean()


def tune_decoder(cfg: DecoderTuneConfig, vae, work: Path):  # noqa: ANN001, ANN201 - diffusers AutoencoderKL
    """Fine-tune `vae`'s decoder in place (resuming from work/decoder.ckpt); returns it in eval mode."""
    work.mkdir(parents=True, exist_ok=True)
    vae.requires_grad_(False)
    params = _trainable(vae)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ckpt = work / "decoder.ckpt"
    start = resume_state(ckpt, vae, opt)
    x, weight, mean, std = training_set(cfg, vae.eval())
    vae.decoder.train()
    vae.post_quant_conv.train()
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        idx = torch.from_numpy(rng.choice(len(x), cfg.batch_size, replace=False))
        noise = torch.randn(mean[idx].shape, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        recon = vae.decode(mean[idx] + std[idx] * noise).sample
        loss = weighted_loss(recon, x[idx], weight[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0:
            progress("decoder", step + 1, cfg.steps, start, t0, loss=loss.item())
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_state(ckpt, {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step + 1})
    return vae.eval()
