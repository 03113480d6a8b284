"""`far world pretrain`: train the world's text-to-image model from scratch, resumably.

Phases, each checkpointed in a work folder so a killed run resumes where it stopped:
1. pool: render `pool_size` seeded scenes once (images + ground truth);
2. vae: train the 4x AutoencoderKL on the pool (L1 + MSE + a small KL);
3. latents: encode the pool once (posterior means) and set the VAE's `scaling_factor` to 1 / their std;
4. unet: train the UNet and the CLIP text encoder jointly on cached latents and captions with attribute
   dropout (`CaptionDropout`), 10 % empty captions (classifier-free guidance), min-SNR-5 weighting and an
   EMA of the weights. Every checkpoint also exports the EMA model as a diffusers directory
   (`snapshots/step-N`), so quality can be measured against steps while the run goes on.

Randomness is derived from (seed, phase, step), never carried: a resumed run draws exactly what an
uninterrupted one would, and two runs with one seed give identical weights (single-threaded CPU).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from far.io import atomic_dir, atomic_file, write_json
from far.tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer
from far.world.captions import CaptionDropout
from far.world.model import WorldModelConfig, assemble_pipeline, build_text_encoder, build_unet, build_vae, vae_factor
from far.world.render import Scene, render, sample_scene


@dataclass(frozen=True)
class PretrainConfig:
    model: WorldModelConfig = field(default_factory=WorldModelConfig)
    seed: int = 0
    pool_size: int = 24000
    subject_counts: tuple[float, float, float] = (0.4, 0.4, 0.2)  # P(1, 2, 3 subjects) in the pool
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    steps: int = 8000
    batch_size: int = 32
    lr: float = 8e-4
    warmup: int = 200
    ema_decay: float = 0.999
    empty_caption: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 250
    snapshot_every: int = 1000  # keep the EMA model of every N-th step for the quality curve
    log_every: int = 25

    def to_dict(self) -> dict:
        return asdict(self)


def _rng(cfg: PretrainConfig, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, phase, step])


def _generator(cfg: PretrainConfig, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(_rng(cfg, phase, step).integers(2**62)))


def progress(what: str, step: int, total: int, start_step: int, t0: float, **figures: float) -> None:
    """One progress line with s/step and ETA (every world trainer prints it the same way)."""
    done = step - start_step
    rate = (time.perf_counter() - t0) / max(done, 1)
    eta = rate * (total - step)
    shown = " ".join(f"{k} {v:.4f}" for k, v in figures.items())
    print(f"[{what}] step {step}/{total} {shown} {rate:.2f} s/step ETA {eta / 60:.1f} min", flush=True)


# ---------------------------------------------------------------------------------------------- pool
def build_pool(cfg: PretrainConfig, work: Path) -> tuple[np.ndarray, list[Scene]]:
    """(N, H, W, 3) uint8 images and their scenes, rendered once and cached as work/pool.npz."""
    path = work / "pool.npz"
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        return data["images"], [Scene.from_dict(d) for d in json.loads(str(data["scenes"]))]
    rng = _rng(cfg, 0, 0)
    counts = rng.choice([1, 2, 3], size=cfg.pool_size, p=cfg.subject_counts)
    scenes = [sample_scene(rng, int(k)) for k in counts]
    images = np.stack([render(s, cfg.model.resolution)[0] for s in scenes])
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, scenes=np.array(json.dumps([s.to_dict() for s in scenes])))
    return images, scenes


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------- vae
def _save_state(path: Path, state: dict) -> None:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def resume_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load a {"model", "optimizer", "step"} checkpoint (if `path` exists) into model and opt; its step, else 0."""
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return state["step"]


def train_vae(cfg: PretrainConfig, work: Path, images: np.ndarray):
    """Train (or resume) the VAE; returns it once `vae_steps` are done (also saved as work/vae)."""
    done_dir = work / "vae"
    if (done_dir / "config.json").is_file():
        from safetensors.torch import load_file

        # Rebuilt from the config rather than from_pretrained, which would write its load path into the
        # config (`_name_or_path`): a resumed run's snapshots must be byte-identical to an uninterrupted one's.
        vae = build_vae(cfg.model, cfg.seed)
        vae.load_state_dict(load_file(done_dir / "diffusion_pytorch_model.safetensors"))
        return vae.eval()
    vae = build_vae(cfg.model, cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt = work / "vae.ckpt"
    start = resume_state(ckpt, vae, opt)
    vae.train()
    t0 = time.perf_counter()
    for step in range(start, cfg.vae_steps):
        rng = _rng(cfg, 1, step)
        x = to_tensor(images[rng.choice(len(images), cfg.vae_batch, replace=False)])
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=_generator(cfg, 1, step))
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0:
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon, x).item(), 1e-10))
            progress("vae", step + 1, cfg.vae_steps, start, t0, loss=loss.item(), psnr_db=psnr)
        if (step + 1) % cfg.checkpoint_every == 0:
            _save_state(ckpt, {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step + 1})
    vae.eval()
    with atomic_dir(done_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return vae


@torch.no_grad()
def encode_pool(cfg: PretrainConfig, work: Path, vae, images: np.ndarray) -> torch.Tensor:
    """Posterior means of the whole pool, (N, C, H/f, W/f), cached; sets vae.config.scaling_factor."""
    path = work / "latents.pt"
    if path.is_file():
        state = torch.load(path, weights_only=True)
    else:
        vae.eval()
        chunks = range(0, len(images), 256)
        means = torch.cat([vae.encode(to_tensor(images[i : i + 256])).latent_dist.mean for i in chunks])
        state = {"latents": means, "scaling_factor": float(1.0 / means.std())}
        _save_state(path, state)
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    return state["latents"] * state["scaling_factor"]


# ---------------------------------------------------------------------------------------------- unet
def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR."""
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def denoising_loss(unet, text_encoder, scheduler, noisy: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   ids: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
    """The pretraining objective of one batch: noisy latents and their noise (B, C, h, w), timesteps t (B,),
    caption token ids (B, 77) -> the min-SNR-weighted epsilon MSE (a scalar)."""
    pred = unet(noisy, t, text_encoder(ids)[0]).sample
    per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(scheduler, t, min_snr_gamma)).mean()


class Ema:
    """Exponential moving average of a list of parameters."""

    def __init__(self, params: list[torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights are not averaged in for long
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, [p.detach() for p in params], alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, params: list[torch.Tensor]) -> None:
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s)


def export_pipeline(vae, text_encoder, unet, ema: Ema, dest: Path, record: dict) -> None:
    """Write the EMA weights as a StableDiffusionPipeline directory (atomically), leaving the live ones intact."""
    import copy

    te, un = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    ema.copy_to(list(te.parameters()) + list(un.parameters()))
    pipe = assemble_pipeline(vae, te.eval(), un.eval())
    with atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "far_world_pretrain.json", record)


def train_unet(cfg: PretrainConfig, work: Path, vae, latents: torch.Tensor, scenes: list[Scene]) -> Path:
    """Train (or resume) UNet + text encoder; returns the directory of the final EMA snapshot."""
    final = work / "snapshots" / f"step-{cfg.steps}"
    if (final / "model_index.json").is_file():
        return final
    tokenizer = build_clip_tokenizer()
    text_encoder = build_text_encoder(cfg.model, cfg.seed + 1)
    # Plain contiguous tensors: channels_last, CPU bf16 autocast and torch.compile were each slower or no faster
    # here (bench/pretrain_step.py, README "Pretraining").
    unet = build_unet(cfg.model, cfg.seed + 2)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = Ema(params, cfg.ema_decay)
    ckpt, start = work / "unet.ckpt", 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        text_encoder.load_state_dict(state["text_encoder"])
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        start = state["step"]
    from far.world.model import build_scheduler

    scheduler = build_scheduler()
    dropout = CaptionDropout()
    text_encoder.train()
    unet.train()
    t0, smooth = time.perf_counter(), None
    for step in range(start, cfg.steps):
        rng = _rng(cfg, 2, step)
        idx = rng.choice(len(latents), cfg.batch_size, replace=False)
        captions = ["" if rng.random() < cfg.empty_caption else dropout(scenes[i], rng) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        gen = _generator(cfg, 2, step)
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        loss = denoising_loss(unet, text_encoder, scheduler, noisy, noise, t, ids, cfg.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(params, step)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if (step + 1) % cfg.log_every == 0:
            progress("unet", step + 1, cfg.steps, start, t0, loss=smooth)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_state(ckpt, {"text_encoder": text_encoder.state_dict(), "unet": unet.state_dict(),
                               "optimizer": opt.state_dict(), "ema": ema.shadow, "step": step + 1})
            record = {"config": cfg.to_dict(), "step": step + 1}
            export_pipeline(vae, text_encoder, unet, ema, work / "snapshots" / "latest", record)
            if (step + 1) % cfg.snapshot_every == 0 or step + 1 == cfg.steps:
                dest = work / "snapshots" / f"step-{step + 1}"
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.copytree(work / "snapshots" / "latest", dest)
    return final


def pretrain(cfg: PretrainConfig, work: Path, threads: int = 1) -> Path:
    """Run (or resume) every phase; returns the final EMA model directory.

    `threads` is not part of the config: results are bit-identical across runs only at a fixed count.
    """
    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(cfg.to_dict())):
        raise ValueError(f"{work}: holds a run with another config ({saved}); use a new --work folder")
    write_json(saved, cfg.to_dict())
    if vae_factor(cfg.model) * 2 ** (len(cfg.model.unet_channels) - 1) > cfg.model.resolution:
        raise ValueError(f"resolution {cfg.model.resolution} is too small for the VAE and UNet levels")
    images, scenes = build_pool(cfg, work)
    vae = train_vae(cfg, work, images)
    latents = encode_pool(cfg, work, vae, images)
    return train_unet(cfg, work, vae, latents, scenes)
