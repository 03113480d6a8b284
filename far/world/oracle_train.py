"""Training and validation of the oracle (far/world/oracle.py) on rendered scenes and their VAE round trips.

Each training image is one of: the render itself; its round trip through the world VAE (posterior mean,
decoded); or a round trip with noise added to the latent, whose blur and colour drift look like what a
small diffusion model generates. Targets are exact: every pixel's owner comes from the renderer's
visible-pixel masks. Seeds are derived from (seed, step), so a run is reproducible and resumable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from far.world.oracle import HEADS, Oracle, OracleNet, to_input
from far.world.render import Scene, render, sample_scene
from far.world.vocab import BACKGROUNDS, CLASSES, COLOUR_NAMES, PATTERNS

IGNORE = -100


@dataclass(frozen=True)
class OracleTrainConfig:
    seed: int = 1000  # scenes are drawn from seeds the base model's pool (seed 0) does not use
    scenes: int = 6000
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    width: int = 32
    resolution: int = 64
    latent_noise: tuple[float, float] = (0.1, 0.5)  # std range of the noise added to scaled latents


def targets(scene: Scene, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel labels (H, W) int64 of one scene from its visible masks; attributes IGNORE on background."""
    h, w = masks.shape[1:]
    out = {k: np.full((h, w), IGNORE, dtype=np.int64) for k in HEADS}
    out["cls"][:] = 0
    for s, m in zip(scene.subjects, masks, strict=True):
        out["cls"][m] = 1 + CLASSES.index(s.cls)
        out["body"][m] = COLOUR_NAMES.index(s.body)
        out["part"][m] = COLOUR_NAMES.index(s.part)
        out["pattern"][m] = PATTERNS.index(s.pattern)
    return out


def render_set(seed: int, n: int, resolution: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, list[Scene]]:
    """n scenes: images (n, H, W, 3) uint8, per-pixel targets (n, H, W), background labels (n,), scenes."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images, tgts = [], {k: [] for k in HEADS}
    for s in scenes:
        img, masks = render(s, resolution)
        images.append(img)
        for k, v in targets(s, masks).items():
            tgts[k].append(v)
    bgs = np.array([BACKGROUNDS.index(s.background) for s in scenes])
    return np.stack(images), {k: np.stack(v) for k, v in tgts.items()}, bgs, scenes


@torch.no_grad()
def round_trip(vae, images: np.ndarray, noise_std: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Images through the VAE (posterior mean, decoded), optionally with N(0, std) noise on scaled latents."""
    x = to_input(images, images.shape[1])
    z = vae.encode(x).latent_dist.mean
    if noise_std is not None:
        scale = vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        z = z + noise * torch.as_tensor(noise_std, dtype=z.dtype).view(-1, 1, 1, 1) / scale
    y = vae.decode(z).sample.clamp(-1, 1)
    return ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def train_oracle(cfg: OracleTrainConfig, vae, log_every: int = 50) -> OracleNet:
    """Train the oracle from scratch (minutes on one CPU thread)."""
    images, tgts, bgs, _ = render_set(cfg.seed, cfg.scenes, cfg.resolution)
    trips = np.concatenate([round_trip(vae, images[i : i + 256]) for i in range(0, len(images), 256)])
    torch.manual_seed(cfg.seed)
    net = OracleNet(cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(images), cfg.batch_size, replace=False)
        kind = rng.integers(0, 3, cfg.batch_size)  # 0 render, 1 round trip, 2 noisy round trip
        batch = np.where((kind == 1)[:, None, None, None], trips[idx], images[idx])
        noisy = np.nonzero(kind == 2)[0]
        if len(noisy):
            std = rng.uniform(*cfg.latent_noise, len(noisy))
            batch[noisy] = round_trip(vae, images[idx[noisy]], std, seed=int(rng.integers(2**31)))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        pixel, bg = net(to_input(batch, cfg.resolution))
        loss = F.cross_entropy(bg, torch.from_numpy(bgs[idx]))
        for k in HEADS:
            loss = loss + F.cross_entropy(pixel[k], torch.from_numpy(tgts[k][idx]), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            rate = (time.perf_counter() - t0) / (step + 1)
            print(f"[oracle] step {step + 1}/{cfg.steps} loss {loss.item():.4f} {rate:.2f} s/step "
                  f"ETA {rate * (cfg.steps - step - 1) / 60:.1f} min", flush=True)
    return net.eval()


def match(truth: Scene, masks: np.ndarray, reading) -> list[tuple[int, int]]:
    """Pairs (truth index, reading index) by Hungarian assignment on mask IoU (pairs with IoU 0 are dropped)."""
    from scipy.optimize import linear_sum_assignment

    if not len(truth.subjects) or not reading.subjects:
        return []
    iou = np.zeros((len(truth.subjects), len(reading.subjects)))
    for i, m in enumerate(masks):
        for j, s in enumerate(reading.subjects):
            iou[i, j] = (m & s.mask).sum() / max((m | s.mask).sum(), 1)
    rows, cols = linear_sum_assignment(-iou)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] > 0]


def accuracy(oracle: Oracle, scenes: list[Scene], images: np.ndarray) -> dict[str, float]:
    """Oracle accuracy on known scenes: background, subject count, and per true subject class/colours/pattern.

    A true subject the oracle missed counts as wrong on every attribute.
    """
    readings = oracle.read(images)
    hits = {"background": 0, "count": 0, "class": 0, "body": 0, "part": 0, "pattern": 0}
    n_subjects = 0
    for scene, image, reading in zip(scenes, images, readings, strict=True):
        _, masks = render(scene, image.shape[0])
        hits["background"] += reading.background == scene.background
        hits["count"] += len(reading.subjects) == len(scene.subjects)
        n_subjects += len(scene.subjects)
        for i, j in match(scene, masks, reading):
            t, r = scene.subjects[i], reading.subjects[j]
            hits["class"] += r.cls == t.cls
            hits["body"] += r.body == t.body
            hits["part"] += r.part == t.part
            hits["pattern"] += r.pattern == t.pattern
    per_image = {"background", "count"}
    return {k: v / (len(scenes) if k in per_image else max(n_subjects, 1)) for k, v in hits.items()} | {
        "images": len(scenes), "subjects": n_subjects}


def save_oracle(net: OracleNet, cfg: OracleTrainConfig, path) -> None:  # noqa: ANN001 - str | Path
    """fp16 safetensors with the architecture in the metadata (width, resolution) and the training seed."""
    from safetensors.torch import save_file

    from far.io import atomic_file

    meta = {"width": str(cfg.width), "resolution": str(cfg.resolution), "seed": str(cfg.seed), "steps": str(cfg.steps)}
    with atomic_file(path) as tmp:
        save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
