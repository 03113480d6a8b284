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
OFFSET_WEIGHT = 20.0  # offsets are image fractions (~0.1): an L1 of 0.01 (0.6 px) then costs 0.2


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
    # Share of clean renders among the training images; the rest are split evenly between the round trips and the
    # noisy round trips. None draws the three versions uniformly (as every oracle before oracle_v6 was trained).
    # Everything the oracle reads in the pipeline has passed through the decoder, so renders can be rarer.
    render_share: float | None = None

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


def instance_targets(masks: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage-1 instance targets for n images from their visible masks ((k, H, W) bool each): the centre
    heatmap (n, H, W) float, a Gaussian (sigma size/32) around each subject's visible centroid, 1 at the
    pixel nearest it; the offsets (n, 2, H, W) float, (dy, dx) / size from each subject pixel to its
    subject's centroid (0 on background); the centre pixels (n, H, W) bool (the heatmap's positives)."""
    heat = np.zeros((len(masks), size, size), dtype=np.float32)
    offset = np.zeros((len(masks), 2, size, size), dtype=np.float32)
    peak = np.zeros((len(masks), size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sigma = size / 32
    for i, ms in enumerate(masks):
        for m in ms:
            if not m.any():
                continue
            ys, xs = np.nonzero(m)
            cy, cx = ys.mean(), xs.mean()
            heat[i] = np.maximum(heat[i], np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))
            py, px = min(int(round(cy)), size - 1), min(int(round(cx)), size - 1)
            heat[i, py, px], peak[i, py, px] = 1.0, True
            offset[i, 0][m], offset[i, 1][m] = (cy - ys) / size, (cx - xs) / size
    return heat, offset, peak


def centre_loss(logit: torch.Tensor, heat: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss: logit (B, H, W), Gaussian target heat (B, H, W), peaks (B, H, W)
    bool; normalised by the number of peaks."""
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = -((1 - p) ** 2) * torch.log(p) * peak
    neg = -((1 - heat) ** 4) * p**2 * torch.log(1 - p) * ~peak
    return (pos.sum() + neg.sum()) / peak.sum().clamp(min=1)


def _jitter(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mask grown or shrunk by one pixel at random: stage 1's regions are never exact."""
    import cv2

    op = rng.integers(3)
    if op == 0:
        return mask
    kernel = np.ones((3, 3), np.uint8)
    out = (cv2.dilate if op == 1 else cv2.erode)(mask.astype(np.uint8), kernel).astype(bool)
    return out if out.any() else mask


def stage1_loss(pixel: PixelNet, x: torch.Tensor, background: np.ndarray, fg: np.ndarray, body: np.ndarray,
                masks: list[np.ndarray]) -> torch.Tensor:
    """PixelNet's loss on images x (B, 3, H, W): background (B,), per-pixel fg and body targets (B, H, W) and
    the visible masks (for the centres and offsets)."""
    heads, bg = pixel(x)
    loss = F.cross_entropy(bg, torch.from_numpy(background))
    loss = loss + F.cross_entropy(heads["fg"], torch.from_numpy(fg))
    loss = loss + F.cross_entropy(heads["body"], torch.from_numpy(body), ignore_index=IGNORE)
    heat, offset, peak = (torch.from_numpy(t) for t in instance_targets(masks, x.shape[-1]))
    loss = loss + centre_loss(heads["centre"][:, 0], heat, peak)
    on_subject = torch.from_numpy(fg).unsqueeze(1).float()  # offsets are only asked of subject pixels
    offset_l1 = ((heads["offset"] - offset).abs() * on_subject).sum() / on_subject.sum().clamp(min=1)
    return loss + OFFSET_WEIGHT * offset_l1


def stage2_loss(subject: SubjectNet, x: torch.Tensor, scenes: list[Scene], masks: list[np.ndarray],
                rng: np.random.Generator) -> torch.Tensor:
    """SubjectNet's loss on every subject of images x (B, 3, H, W), read through its jittered true mask."""
    owner = np.array([j for j, sc in enumerate(scenes) for _ in sc.subjects], dtype=np.int64)
    truth = [s for sc in scenes for s in sc.subjects]
    crop_masks = np.array([_jitter(m, rng) for ms in masks for m in ms]).reshape(-1, *x.shape[-2:])
    keep = crop_masks.reshape(len(crop_masks), -1).any(1)  # a fully hidden subject has nothing to read
    out = subject(subject_crops(x, owner[keep], crop_masks[keep]))
    truth = [s for s, k in zip(truth, keep, strict=True) if k]
    loss = torch.zeros(())
    for head, vocab in (("cls", CLASSES), ("body", COLOUR_NAMES), ("part", COLOUR_NAMES), ("pattern", PATTERNS)):
        loss = loss + F.cross_entropy(out[head], torch.tensor([vocab.index(getattr(s, head)) for s in truth]))
    return loss


def _versions(rng: np.random.Generator, n: int, render_share: float | None) -> np.ndarray:
    """(n,) indices into (render, round trip, noisy round trip) for one batch."""
    if render_share is None:
        return rng.integers(0, 3, n)
    if not 0.0 <= render_share <= 1.0:
        raise ValueError(f"oracle render_share: {render_share} is not in [0, 1]")
    trip = (1.0 - render_share) / 2
    return rng.choice(3, n, p=[render_share, trip, trip])


def train_oracle(cfg: OracleTrainConfig, vae, log_every: int = 50, init: Oracle | None = None) -> Oracle:
    """Train both stages, from scratch or on from `init` (an oracle of the same widths and resolution, whose
    nets are trained in place); returns the Oracle (eval mode)."""
    if init is not None:
        _check_init(cfg, init)  # before minutes of rendering
    images, masks, bgs, scenes = render_set(cfg.seed, cfg.scenes, cfg.resolution)
    rng0 = np.random.default_rng(cfg.seed)
    versions = np.stack([images, round_trip(vae, images),
                         round_trip(vae, images, rng0.uniform(*cfg.latent_noise, len(images)), cfg.seed)])
    fg, body = pixel_targets(masks, scenes, cfg.resolution)
    torch.manual_seed(cfg.seed)
    if init is None:
        pixel, subject = PixelNet(cfg.width), SubjectNet(cfg.subject_width)
    else:
        pixel, subject = init.pixel.train(), init.subject.train()
    params = list(pixel.parameters()) + list(subject.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(images), cfg.batch_size, replace=False)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        x = to_input(versions[_versions(rng, cfg.batch_size, cfg.render_share), idx], cfg.resolution)
        batch_masks = [masks[i] for i in idx]
        loss = stage1_loss(pixel, x, bgs[idx], fg[idx], body[idx], batch_masks)
        loss = loss + stage2_loss(subject, x, [scenes[i] for i in idx], batch_masks, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            progress("oracle", step + 1, cfg.steps, 0, t0, loss=loss.item())
    return Oracle(pixel, subject, cfg.resolution)


def _check_init(cfg: OracleTrainConfig, init: Oracle) -> None:
    found = init.widths() | {"resolution": init.resolution}
    wanted = {k: getattr(cfg, k) for k in found}
    if found != wanted:
        raise ValueError(f"oracle init {init.label}: its {found} differ from the training config's {wanted}")


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


PER_IMAGE = ("background", "count", "too_many", "too_few")
PER_SUBJECT = ("class", "body", "part", "pattern")


def _hits(scene: Scene, size: int, reading) -> dict[str, int]:
    """What one reading got right of its scene: per-image flags (PER_IMAGE) and per-subject counts (PER_SUBJECT)."""
    _, masks = render(scene, size)
    n_read, n_true = len(reading.subjects), len(scene.subjects)
    hits = {"background": int(reading.background == scene.background), "count": int(n_read == n_true),
            "too_many": int(n_read > n_true), "too_few": int(n_read < n_true)} | dict.fromkeys(PER_SUBJECT, 0)
    for i, j in match(masks, reading):
        t, r = scene.subjects[i], reading.subjects[j]
        hits["class"] += r.cls == t.cls
        hits["body"] += r.body == t.body
        hits["part"] += r.part == t.part
        hits["pattern"] += r.pattern == t.pattern
    return hits


def _figures(hits: list[dict[str, int]], n_subjects: int) -> dict[str, float]:
    """Shares from per-scene hits: per image over the scenes, per subject over their `n_subjects`."""
    return {k: sum(h[k] for h in hits) / max(len(hits) if k in PER_IMAGE else n_subjects, 1)
            for k in PER_IMAGE + PER_SUBJECT} | {"images": len(hits), "subjects": n_subjects}


def accuracy(oracle: Oracle, scenes: list[Scene], images: np.ndarray) -> dict:
    """Oracle accuracy on known scenes: per image background and subject count (and the shares of images read
    with too many and too few subjects), per true subject class/colours/pattern; the same figures per number of
    subjects in the scene under `by_subjects`. A true subject the oracle missed is wrong on every attribute."""
    readings = oracle.read(images)
    hits = [_hits(s, image.shape[0], r) for s, image, r in zip(scenes, images, readings, strict=True)]
    out = _figures(hits, sum(len(s.subjects) for s in scenes))
    out["by_subjects"] = {}
    for k in sorted({len(s.subjects) for s in scenes}):
        group = [h for h, s in zip(hits, scenes, strict=True) if len(s.subjects) == k]
        out["by_subjects"][str(k)] = _figures(group, k * len(group))
    return out
