"""Training and validation of the oracle (far/world/oracle.py) on rendered scenes and their VAE round trips.

Every scene is seen in three versions: the render itself; its round trip through the world VAE (posterior
mean, decoded); and a round trip with noise added to the scaled latent (std drawn from `latent_noise`),
whose blur and colour drift look like what a small diffusion model generates. Targets are exact: each
pixel's owner comes from the renderer's visible-pixel masks. Seeds come from (seed, step), so a run is
reproducible; it takes minutes on one CPU thread.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from far.world.oracle import Oracle, PixelNet, SubjectNet, subject_crops, to_input
from far.world.pretrain import progress
from far.world.render import Scene, render, sample_scene
from far.world.vocab import BACKGROUNDS, CLASSES, COLOUR_NAMES, PATTERNS

IGNORE = -100


@dataclass(frozen=True)
class OracleTrainConfig:
    seed: int = 1000  # scenes are drawn from seeds the base model's pool (seed 0) does not use
    scenes: int = 6000
    steps: int = 1500
    batch_size: int = 32  # images per step (stage 1); stage 2 reads every subject in them
    lr: float = 2e-3
    width: int = 32
    subject_width: int = 32
    resolution: int = 64
    latent_noise: tuple[float, float] = (0.1, 0.6)  # std range of the noise added to scaled latents

    def to_dict(self) -> dict:
        return asdict(self)


def render_set(seed: int, n: int, resolution: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, list[Scene]]:
    """n scenes: images (n, H, W, 3) uint8, visible masks per scene ((k, H, W) bool), backgrounds (n,), scenes."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    rendered = [render(s, resolution) for s in scenes]
    bgs = np.array([BACKGROUNDS.index(s.background) for s in scenes])
    return np.stack([r[0] for r in rendered]), [r[1] for r in rendered], bgs, scenes


@torch.no_grad()
def round_trip(vae, images: np.ndarray, noise_std: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Images through the VAE (posterior mean, decoded), optionally with N(0, std) noise on scaled latents."""
    out = []
    for i in range(0, len(images), 256):
        x = to_input(images[i : i + 256], images.shape[1])
        z = vae.encode(x).latent_dist.mean
        if noise_std is not None:
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + i))
            std = torch.as_tensor(noise_std[i : i + 256], dtype=z.dtype).view(-1, 1, 1, 1)
            z = z + noise * std / vae.config.scaling_factor
        y = vae.decode(z).sample.clamp(-1, 1)
        out.append(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def pixel_targets(masks: list[np.ndarray], scenes: list[Scene], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 targets (n, H, W) int64: foreground {0, 1}, and the owner's body colour (IGNORE on background)."""
    fg = np.zeros((len(scenes), size, size), dtype=np.int64)
    body = np.full((len(scenes), size, size), IGNORE, dtype=np.int64)
    for i, (scene, ms) in enumerate(zip(scenes, masks, strict=True)):
        for s, m in zip(scene.subjects, ms, strict=True):
            fg[i][m] = 1
            body[i][m] = COLOUR_NAMES.index(s.body)
    return fg, body


def _jitter(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mask grown or shrunk by one pixel at random: stage 1's regions are never exact."""
    import cv2

    op = rng.integers(3)
    if op == 0:
        return mask
    kernel = np.ones((3, 3), np.uint8)
    out = (cv2.dilate if op == 1 else cv2.erode)(mask.astype(np.uint8), kernel).astype(bool)
    return out if out.any() else mask


def train_oracle(cfg: OracleTrainConfig, vae, log_every: int = 50) -> Oracle:
    """Train both stages from scratch; returns the Oracle (eval mode)."""
    images, masks, bgs, scenes = render_set(cfg.seed, cfg.scenes, cfg.resolution)
    rng0 = np.random.default_rng(cfg.seed)
    versions = np.stack([images, round_trip(vae, images),
                         round_trip(vae, images, rng0.uniform(*cfg.latent_noise, len(images)), cfg.seed)])
    fg, body = pixel_targets(masks, scenes, cfg.resolution)
    torch.manual_seed(cfg.seed)
    pixel, subject = PixelNet(cfg.width), SubjectNet(cfg.subject_width)
    params = list(pixel.parameters()) + list(subject.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(images), cfg.batch_size, replace=False)
        batch = versions[rng.integers(0, 3, cfg.batch_size), idx]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        x = to_input(batch, cfg.resolution)
        heads, bg = pixel(x)
        loss = F.cross_entropy(bg, torch.from_numpy(bgs[idx]))
        loss = loss + F.cross_entropy(heads["fg"], torch.from_numpy(fg[idx]))
        loss = loss + F.cross_entropy(heads["body"], torch.from_numpy(body[idx]), ignore_index=IGNORE)
        owner = np.array([j for j, i in enumerate(idx) for _ in scenes[i].subjects], dtype=np.int64)
        subj = [s for i in idx for s in scenes[i].subjects]
        crops_masks = np.array([_jitter(m, rng) for i in idx for m in masks[i]]).reshape(-1, *images.shape[1:3])
        keep = crops_masks.reshape(len(crops_masks), -1).any(1)  # a fully hidden subject has nothing to read
        out = subject(subject_crops(x, owner[keep], crops_masks[keep]))
        subj = [s for s, k in zip(subj, keep, strict=True) if k]
        for head, vocab, attr in (("cls", CLASSES, "cls"), ("body", COLOUR_NAMES, "body"),
                                  ("part", COLOUR_NAMES, "part"), ("pattern", PATTERNS, "pattern")):
            target = torch.tensor([vocab.index(getattr(s, attr)) for s in subj])
            loss = loss + F.cross_entropy(out[head], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            progress("oracle", step + 1, cfg.steps, 0, t0, loss=loss.item())
    return Oracle(pixel, subject, cfg.resolution)


def match(masks: np.ndarray, reading) -> list[tuple[int, int]]:
    """Pairs (truth index, reading index) by Hungarian assignment on mask IoU (pairs with IoU 0 are dropped)."""
    from scipy.optimize import linear_sum_assignment

    if not len(masks) or not reading.subjects:
        return []
    iou = np.zeros((len(masks), len(reading.subjects)))
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
        for i, j in match(masks, reading):
            t, r = scene.subjects[i], reading.subjects[j]
            hits["class"] += r.cls == t.cls
            hits["body"] += r.body == t.body
            hits["part"] += r.part == t.part
            hits["pattern"] += r.pattern == t.pattern
    per_image = {"background", "count"}
    return {k: v / (len(scenes) if k in per_image else max(n_subjects, 1)) for k, v in hits.items()} | {
        "images": len(scenes), "subjects": n_subjects}
