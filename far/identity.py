"""Multi-concept identity (detect, crop, compare) and attention leakage, from each concept token's attention map.

In an image that should show concepts k = 1..K, the sample stage saved, per concept, its token's
cross-attention map M_k (soft, max-normalised to [0, 1], at the attention resolution S x S, averaged over
heads, layers and steps). Here:

- **Region** of concept k, by `eval.regions`:
  `attention` (default): R_k = {(M_k - min M_k) / (max M_k - min M_k) >= eval.region_threshold}, a {0,1}
  mask at S x S (min-max scaled: the maps have a near-uniform floor);
  `segment`: the generated image's foreground mask F from far.segment (backend `segment.backend`), each
  foreground pixel given to the concept whose (bilinearly upsampled) map is largest there, R_k = F and
  argmax_j M_j = k, a {0,1} mask at image resolution. R_k is the concept's region for the leakage metric;
  for identity, the 4-connected component of R_k holding the most attention mass is the detected subject,
  its bounding box (scaled to image pixels, grown by `eval.crop_padding`) the crop.
- **Identity** (the peer is MuDI's Detect-and-Compare, which detects subjects with OWLv2 and compares them
  with DreamSim): each crop is compared with every concept's reference subjects (DINO, mean cosine over the
  references, each reference cropped to its segmentation bbox), giving a similarity row s_k over concepts.
  The crop is *identified* when argmax_j s_kj = k; `identity_accuracy` is the share identified; the
  `identity_mixing` score is max_{j != k} s_kj / s_kk (1 = the crop is as similar to another concept as to
  its own, > 1 = more), and `identity_margin` is s_kk - max_{j != k} s_kj. Unlike MuDI we do not run a
  detector: the model's own attention says which region is meant to be which concept, so no matching step
  is needed. Our choice; a concept whose map is all zero counts as not found (wrong, no mixing value).
- **Leakage** of A into B: share of A's attention mass inside B's region, sum(M_A * R_B) / sum(M_A) (at the
  regions' resolution), for
  every ordered pair of concepts in the image (so A->B and B->A are both reported). 0 = none; when both
  tokens attend the same place it approaches the share of A's mass that lies on that place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from far.errors import InvalidInputError


def load_map(path: Path) -> np.ndarray:
    """(S, S) float32 soft map, max-normalised to [0, 1] (an all-zero map stays zero)."""
    try:
        m = np.load(path).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable .npy attention map: {exc}") from None
    if m.ndim != 2 or not np.isfinite(m).all() or (m < 0).any():
        raise InvalidInputError(f"{path}: expected a finite, non-negative (S, S) attention map, got shape {m.shape}")
    peak = float(m.max())
    return m / peak if peak > 0 else m


def region(m: np.ndarray, threshold: float) -> np.ndarray:
    """{0,1} bool (S, S): where the min-max-scaled map reaches `threshold` (empty for a constant map).

    Min-max, not max, scaling: cross-attention maps carry a near-uniform floor (a token attends everywhere a
    little), which with max-scaling alone puts every cell above a mid threshold and makes every region the
    whole image.
    """
    lo, hi = float(m.min()), float(m.max())
    return (m - lo >= threshold * (hi - lo)) if hi > lo else np.zeros(m.shape, bool)


def upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, S) map -> (H, W) float32 for an image of `size` (W, H), bilinear (as attention maps are overlaid)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def attention_regions(maps: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """`eval.regions: attention`: {concept: (S, S) {0,1} bool region}, each from its own map (may overlap)."""
    return {k: region(m, threshold) for k, m in maps.items()}


def segment_regions(maps: dict[str, np.ndarray], foreground: np.ndarray) -> dict[str, np.ndarray]:
    """`eval.regions: segment`: {concept: (H, W) {0,1} bool}, the foreground split by the largest map.

    maps: (H, W) upsampled soft maps; foreground: (H, W) bool subject mask. Disjoint by construction; a
    concept whose map is all zero gets no pixels.
    """
    names = list(maps)
    stack = np.stack([maps[k] for k in names])  # (K, H, W)
    owner = stack.argmax(axis=0)
    alive = stack.max(axis=0) > 0
    return {k: foreground & alive & (owner == i) & (stack[i] > 0) for i, k in enumerate(names)}


def subject_bbox(m: np.ndarray, threshold: float, size: tuple[int, int], padding: float) -> tuple[int, ...] | None:
    """Pixel bbox (x0, y0, x1, y1; exclusive end) in an image of `size` (W, H) of the main attention blob."""
    return region_bbox(region(m, threshold), m, size, padding)


def region_bbox(mask: np.ndarray, weight: np.ndarray, size: tuple[int, int], padding: float) -> tuple[int, ...] | None:
    """Pixel bbox (x0, y0, x1, y1; exclusive end), in an image of `size` (W, H), of a region's main blob.

    mask: {0,1} region, weight: soft map, both at one resolution (S x S or the image's). The main blob is the
    4-connected component of `mask` with the most weight; its box is scaled to the image and grown by
    `padding` x its side on each side. None for an empty region.
    """
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    mass = ndimage.sum(weight, labels, index=np.arange(1, n + 1))
    ys, xs = np.nonzero(labels == int(np.argmax(mass)) + 1)
    s_h, s_w = mask.shape
    w, h = size
    x0, x1 = xs.min() / s_w * w, (xs.max() + 1) / s_w * w
    y0, y1 = ys.min() / s_h * h, (ys.max() + 1) / s_h * h
    px, py = padding * (x1 - x0), padding * (y1 - y0)
    return (max(0, int(x0 - px)), max(0, int(y0 - py)), min(w, int(np.ceil(x1 + px))), min(h, int(np.ceil(y1 + py))))


def leakage(maps: dict[str, np.ndarray], regions: dict[str, np.ndarray]) -> dict[tuple[str, str], float]:
    """{(A, B): share of A's attention mass inside B's region} for every ordered pair A != B.

    Maps and regions of one image share one resolution. NaN (undefined, left out of means) when A's map is
    all zero or B has no region: a subject that was not found must not read as "no leakage".
    """
    shapes = {m.shape for m in (*maps.values(), *regions.values())}
    if len(shapes) > 1:
        raise InvalidInputError(f"attention maps / regions of one image differ in shape: {sorted(shapes)}")
    out = {}
    for a, ma in maps.items():
        total = float(ma.sum())
        for b in maps:
            if a != b:
                defined = total > 0 and regions[b].any()
                out[(a, b)] = float((ma * regions[b]).sum() / total) if defined else float("nan")
    return out


@dataclass(frozen=True)
class Identity:
    """The verdict for one concept's crop in one image."""

    concept: str
    found: bool  # it had a region (attention or segmentation)
    bbox: tuple[int, ...] | None
    similarity: dict[str, float]  # concept -> mean DINO cosine of the crop to that concept's references
    correct: bool
    mixing: float  # max wrong / right (NaN when not found or the right similarity is <= 0)
    margin: float  # right - max wrong (NaN when not found or there is no other concept)


def judge(concept: str, found: bool, bbox: tuple[int, ...] | None, similarity: dict[str, float]) -> Identity:
    """Identity verdict from a crop's similarity to every concept (the crop should be `concept`)."""
    right = similarity[concept]
    wrong = [v for k, v in similarity.items() if k != concept]
    if not found or not wrong:
        return Identity(concept, found, bbox, similarity, found and not wrong, float("nan"), float("nan"))
    best_wrong = max(wrong)
    return Identity(
        concept, found, bbox, similarity,
        correct=right > best_wrong,
        mixing=best_wrong / right if right > 0 else float("nan"),
        margin=right - best_wrong,
    )
