"""Offline subject segmentation without weights: OpenCV GrabCut with letterbox removal, clean-up and refinement.

Plain GrabCut from a centred rectangle at full resolution (the usual offline fallback; `segment_rect_grabcut`,
the baseline in bench/segment_quality.py) fails in three recurring ways on reference photos, which we fix:

1. Letterboxed photos (black/white bars, common in DreamBench): the bars are the "border colour", so the real
   background inside the picture becomes foreground. `letterbox` finds uniform near-black/near-white bars and
   we segment only the picture inside them.
2. Stray pieces and holes: after GrabCut we open/close with a small kernel, keep the largest component plus
   sizeable components next to it, and fill holes (a subject is one solid region in these photos).
3. Speed and stability: the colour models are fitted at WORK_SIDE (256 px), where GrabCut is ~4x cheaper and
   less distracted by texture; the boundary is then refined at up to REFINE_SIDE (512 px) by a second GrabCut
   that may only move pixels within a narrow band (2 % of the side) around the coarse edge.

What we tried and measured on the `tune` split (bench/segment_quality.py) and did NOT keep, because it was
worse or unstable: a border-colour-contrast saliency map or a minimum-barrier-distance saliency map as
initialisation or as "probably background" hints, leaving the border band undecided (probable background),
and majority votes over several rectangle margins.

A concept's photos are segmented together by far/cosegment.py, which reuses these steps (`crop_letterbox`,
`coarse_mask`, `finish`) around a shared subject colour model.

Masks are (H, W) bool {0,1} at the input resolution; every step is deterministic (OpenCV's RNG is seeded).
"""

from __future__ import annotations

import cv2
import numpy as np

WORK_SIDE = 256  # long side at which the colour models are fitted
REFINE_SIDE = 512  # long side of the band-limited boundary refinement (larger images are refined downscaled)
MARGIN = 0.03  # border band (fraction of each side) taken as definite background
ITERS, REFINE_ITERS = 5, 2


def _resize(img: np.ndarray, long_side: int, interp: int = cv2.INTER_AREA) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    if abs(s - 1) < 1e-6:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: `mask` with every background region not connected to the image border filled."""
    m = mask.astype(np.uint8)
    h, w = m.shape
    flood = np.zeros((h + 2, w + 2), np.uint8)
    flood[1:-1, 1:-1] = m
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return (m | (1 - flood[1:-1, 1:-1])).astype(bool)


def letterbox(rgb: np.ndarray, tol: float = 6.0, min_frac: float = 0.02) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the picture inside uniform near-black (< 20) or near-white (> 235) bars.

    A bar is a run of rows/columns from an edge, each with std < `tol` and the same mean; bars thinner than
    `min_frac` of the side are ignored. A plain coloured studio background is not a bar (mean test)."""
    gray = rgb.astype(np.float32).mean(axis=2)
    h, w = gray.shape

    def run(lines: list[np.ndarray]) -> int:
        ref = None
        for n, line in enumerate(lines):
            mean = float(line.mean())
            if line.std() > tol or 20 < mean < 235 or (ref is not None and abs(mean - ref) > tol):
                return n
            ref = mean if ref is None else ref
        return len(lines)

    top = run([gray[i] for i in range(h // 3)])
    bottom = run([gray[h - 1 - i] for i in range(h // 3)])
    left = run([gray[:, i] for i in range(w // 3)])
    right = run([gray[:, w - 1 - i] for i in range(w // 3)])

    def keep(n: int, side: int) -> int:
        return n if n >= min_frac * side else 0

    return keep(top, h), h - keep(bottom, h), keep(left, w), w - keep(right, w)


def _grabcut(bgr: np.ndarray, labels: np.ndarray, iters: int) -> np.ndarray:
    """GrabCut from a GC_* label map; (H, W) bool foreground. Degenerate label maps are returned as they are."""
    fg = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD))
    if fg.all() or not fg.any():
        return fg
    labels = labels.copy()
    cv2.setRNGSeed(0)  # GMM initialisation uses k-means with OpenCV's RNG: fixed for reproducible masks
    cv2.grabCut(bgr, labels, None, np.zeros((1, 65)), np.zeros((1, 65)), iters, cv2.GC_INIT_WITH_MASK)
    return np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD))


def clean_mask(mask: np.ndarray, keep: float = 0.05, near: float = 0.03) -> np.ndarray:
    """(H, W) bool: opened/closed, the largest component plus components of >= `keep` x its area lying within
    `near` x the long side of it, holes filled."""
    k = _disk(max(1, min(mask.shape) // 200))
    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, k)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, k)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return m.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    main = int(np.argmax(areas)) + 1
    reach = cv2.dilate((labels == main).astype(np.uint8), _disk(max(1, round(near * max(mask.shape))))) > 0
    near_ids = np.unique(labels[reach])
    kept = [i for i in near_ids if i and areas[i - 1] >= keep * areas[main - 1]]
    return fill_holes(np.isin(labels, kept + [main]))


def _refine(rgb: np.ndarray, coarse_small: np.ndarray) -> np.ndarray:
    """Move the boundary of a coarse mask onto the image's edges: GrabCut limited to a band around it."""
    h, w = rgb.shape[:2]
    big = _resize(rgb, min(REFINE_SIDE, max(h, w)))
    bh, bw = big.shape[:2]
    coarse = cv2.resize(coarse_small.astype(np.uint8), (bw, bh), interpolation=cv2.INTER_LINEAR) > 0
    band = _disk(max(2, round(0.02 * max(bh, bw))))
    labels = np.full((bh, bw), cv2.GC_BGD, np.uint8)
    labels[cv2.dilate(coarse.astype(np.uint8), band) > 0] = cv2.GC_PR_BGD
    labels[coarse] = cv2.GC_PR_FGD
    labels[cv2.erode(coarse.astype(np.uint8), band) > 0] = cv2.GC_FGD
    fine = clean_mask(_grabcut(cv2.cvtColor(big, cv2.COLOR_RGB2BGR), labels, REFINE_ITERS))
    if (bh, bw) != (h, w):
        fine = cv2.resize(fine.astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR) > 0
    return fine


def border_band(shape: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: the MARGIN band along the picture's edges, taken as definite background."""
    sh, sw = shape
    band = np.zeros((sh, sw), bool)
    mh, mw = max(1, round(MARGIN * sh)), max(1, round(MARGIN * sw))
    band[:mh], band[-mh:], band[:, :mw], band[:, -mw:] = (True,) * 4
    return band


def coarse_mask(small: np.ndarray) -> np.ndarray:
    """(h, w) bool: GrabCut of a WORK_SIDE (h, w, 3) RGB picture from its border band, cleaned."""
    labels = np.where(border_band(small.shape[:2]), cv2.GC_BGD, cv2.GC_PR_FGD).astype(np.uint8)
    return clean_mask(_grabcut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), labels, ITERS))


def crop_letterbox(rgb: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """((y0, y1, x0, x1), picture): the (h, w, 3) picture inside the letterbox bars of an RGB image."""
    box = y0, y1, x0, x1 = letterbox(rgb)
    return box, np.ascontiguousarray(rgb[y0:y1, x0:x1])


def finish(rgb: np.ndarray, box: tuple[int, int, int, int], picture: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """(H, W) bool mask of the whole image: the coarse (WORK_SIDE) picture mask refined, pasted inside the box."""
    y0, y1, x0, x1 = box
    mask = np.zeros(rgb.shape[:2], bool)
    if coarse.any():
        mask[y0:y1, x0:x1] = _refine(picture, coarse)
    return mask


def segment_grabcut(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool {0,1} subject mask of an (H, W, 3) uint8 RGB photo with one main subject."""
    box, picture = crop_letterbox(rgb)
    return finish(rgb, box, picture, coarse_mask(_resize(picture, WORK_SIDE)))


def segment_rect_grabcut(rgb: np.ndarray, margin: float = 0.05, iters: int = 5) -> np.ndarray:
    """Baseline: plain GrabCut from a rectangle `margin` inside the border, full resolution; (H, W) bool."""
    h, w = rgb.shape[:2]
    rect = (round(margin * w), round(margin * h), round((1 - 2 * margin) * w), round((1 - 2 * margin) * h))
    labels = np.zeros((h, w), np.uint8)
    cv2.setRNGSeed(0)
    cv2.grabCut(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), labels, rect, np.zeros((1, 65)), np.zeros((1, 65)), iters,
                cv2.GC_INIT_WITH_RECT)
    return np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD))
