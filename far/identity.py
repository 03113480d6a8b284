"""Multi-concept identity (find subjects from pixels, assign, compare) and the attention diagnostics (`attn_*`).

**Identity** (the verdict; after MuDI's Detect-and-Compare). In an image that should show concepts
k = 1..K, a subject finder (far/subjects.py, `eval.subject_finder`) that never sees the attention maps
returns instances; each instance's bbox crop (grown by `eval.crop_padding`) is compared (DINO, mean cosine
over the references, each reference cropped to its segmentation bbox) with EVERY concept's references,
giving a similarity row s_i over concepts. Instances are assigned to the prompt's K concepts by the
Hungarian algorithm on those similarities (`assign`: one instance per concept, total similarity maximal).
Concept k is *identified* when it got an instance whose highest similarity is k's own;
`identity_accuracy` is the share of (image, concept) pairs identified, `identity_mixing` is
max_{j != k} s_j / s_k of k's instance (>= 1: the instance looks at least as much like another concept),
`identity_margin` s_k - max_{j != k} s_j. A concept left without an instance (fewer found than asked) is
not identified and has no mixing value. Identity measures "does each concept appear, looking more like
itself than like the others"; it cannot tell a subject drawn with the other's attributes from a
half-and-half chimera if the chimera still looks most like one concept, and it is only as good as the
finder (touching subjects are one instance for `segment`) and the embedding.

**Attention diagnostics** (`attn_*`: they read the maps Localized Refinement trains, so they describe
the training objective, never the verdict). The sample stage saved, per concept, its token's
cross-attention map M_k (soft, float32, max-normalised to [0, 1], at S x S, averaged over heads, layers
and steps).

- `attn_leakage` of concepts A, B: the overlap of the two maps as distributions,
  sum_x min(p_A(x), p_B(x)) with p_k = M_k / sum M_k (histogram intersection = 1 - total variation
  distance). 1 when the tokens attend identically (total leakage), 0 when their maps are disjoint, and
  1 when both maps are uniform: the degenerate image is the worst case and counted, never dropped. A map
  with no mass at all (a token attending nowhere) cannot tell the concepts apart and is read as uniform.
  Symmetric (A with B = B with A). Why this and not the share of A's mass in B's thresholded region (the
  old definition): that number was set by the size of B's region and the maps' floor, read identical maps
  as 0.10 and separated diffuse maps as 0.2, and was undefined (NaN) for uniform maps. A shared floor
  (every token attends everywhere a little) counts as overlap: it is shared attention. A uniform map next
  to a localised one scores the localised map's share of the image: the tokens are told apart, even
  though one of them is not localised.
- `attn_identity_*`: the old crops. Region of concept k, by `eval.regions`: `attention`: R_k = {(M_k - min
  M_k) / (max M_k - min M_k) >= eval.region_threshold} at S x S; `segment`: the generated image's
  foreground split by the largest (upsampled) map. The crop is the bbox of R_k's component holding the
  most attention mass, judged as above but with no assignment step (the map says which crop is which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from far.errors import InvalidInputError


def load_map(path: Path) -> np.ndarray:
    """(S, S) float32 soft map, max-normalised to [0, 1] (an all-zero map stays zero).

    Only float32 files are accepted: float16 leaves a near-uniform map two distinct values, and its
    "region" quantisation noise.
    """
    try:
        m = np.load(path)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable .npy attention map: {exc}") from None
    if m.dtype != np.float32:
        raise InvalidInputError(f"{path}: attention map is {m.dtype}, expected float32 (maps from an older sample "
                                "stage were float16: re-run `dvc repro sample`)")
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
    box = (xs.min() / s_w * w, ys.min() / s_h * h, (xs.max() + 1) / s_w * w, (ys.max() + 1) / s_h * h)
    return pad_box(box, size, padding)


def pad_box(box: tuple[float, ...], size: tuple[int, int], padding: float) -> tuple[int, int, int, int]:
    """Pixel bbox (x0, y0, x1, y1; exclusive end) grown by `padding` x its side on each side, inside `size` (W, H)."""
    x0, y0, x1, y1 = box
    w, h = size
    px, py = padding * (x1 - x0), padding * (y1 - y0)
    return (max(0, int(x0 - px)), max(0, int(y0 - py)), min(w, int(np.ceil(x1 + px))), min(h, int(np.ceil(y1 + py))))


def as_distribution(m: np.ndarray) -> np.ndarray:
    """A non-negative map as a distribution over its cells (sums to 1); a map with no mass reads as uniform."""
    total = float(m.sum(dtype=np.float64))
    return (m / total if total > 0 else np.full(m.shape, 1.0 / m.size)).astype(np.float64)


def leakage(maps: dict[str, np.ndarray]) -> dict[tuple[str, str], float]:
    """{(A, B): overlap sum_x min(p_A, p_B) in [0, 1]} for every unordered pair, A before B in `maps`' order.

    maps: {concept: (S, S) non-negative map} of one image (any scale: each is normalised to sum 1).
    1 = identical maps or both uniform (worst), 0 = disjoint (see the module docstring). Always defined.
    """
    shapes = {m.shape for m in maps.values()}
    if len(shapes) > 1:
        raise InvalidInputError(f"attention maps of one image differ in shape: {sorted(shapes)}")
    dist = {k: as_distribution(m) for k, m in maps.items()}
    names = list(maps)
    return {(a, b): float(np.minimum(dist[a], dist[b]).sum()) for i, a in enumerate(names) for b in names[i + 1 :]}


def assign(concepts: list[str], similarity: np.ndarray) -> dict[str, int | None]:
    """{concept: index of its instance, or None}: Hungarian assignment maximising the total similarity.

    similarity: (n_instances, len(concepts)) similarity of each found instance to each of the prompt's
    concepts. Each instance serves at most one concept; with fewer instances than concepts some get None.
    """
    out: dict[str, int | None] = dict.fromkeys(concepts)
    if similarity.size:
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        for r, c in zip(rows, cols, strict=True):
            out[concepts[c]] = int(r)
    return out


@dataclass(frozen=True)
class Identity:
    """The verdict for one concept's crop in one image."""

    concept: str
    found: bool  # it got an instance (or, for attn_identity, a region)
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
