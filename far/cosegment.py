"""Co-segmentation of one concept's reference photos: the subject's colours are shared, the backgrounds are not.

A concept folder holds 3-6 photos of the SAME subject on different backgrounds. Single-image GrabCut
(far/grabcut.py) has to guess which colours are the subject's from one photo; its typical failures are a piece of
background kept (a grey block under a teapot, a window next to a backpack) or a part of the subject dropped.
`segment_concept` uses the other photos as evidence:

1. First pass: the single-image coarse GrabCut mask of every photo (WORK_SIDE px, inside its letterbox).
2. Shared foreground model: a GrabCut colour GMM (OpenCV's own, 5 components) fitted to foreground pixels pooled
   from the photos' first-pass masks (eroded 2 px; SHARED_SAMPLES pixels, each photo contributing equally). A pixel
   of photo j is drawn with probability given by its CONSISTENCY: p_others(c) / (p_others(c) + p_bg_j(c)), with
   p_others the mean colour histogram of the other photos' foregrounds and p_bg_j photo j's own background
   histogram (16 levels per channel, smoothed), so background that crept into one photo's mask hardly counts.
3. Co-segmented candidates: one graph cut per photo with that foreground GMM and a background GMM of the photo's
   own first-pass background, both FROZEN (cv2.GC_EVAL_FREEZE_MODEL: GrabCut would otherwise re-learn them from
   the photo alone and drift back to the first pass). Four variants: the shared model from all photos or from the
   OTHER photos only (leave-one-out: the photo's own mistakes are not in its model), times a background model of
   all first-pass background pixels or of pixels drawn with probability p_bg_i(c) / (p_bg_i(c) + p_others(c))
   (subject colours that the first pass left in the background, e.g. a grey cat's chest on a grey sofa, do not
   teach the background model that they are background).
4. Selection, per photo, without labels: among first pass and the four co-segmented masks (masks under 1 % or over
   95 % of the picture are ruled out), the one whose colour histogram is most like the other photos' first-pass
   foreground histogram (Bhattacharyya coefficient). Co-segmentation sometimes does worse (a white bowl on a white
   cloth loses its white part to the background model), and this choice keeps the first pass there.
5. The chosen coarse mask is refined at up to REFINE_SIDE px as in the single-image path.

Measured by bench/segment_quality.py (mean IoU, split `tune`: 0.710 single-image -> 0.811 co-segmented); the
choices were made on `tune` only. Tried there and not kept (worse or no change): GrabCut re-initialised from the
shared-vs-own likelihood ratio with re-learnt models (lost a grey cat on a grey sofa), the first-pass mask with a
likelihood-ratio veto of colours absent from the other photos (GrabCut re-learnt its way back), continuing
GrabCut after the frozen cut, adding the photo's inconsistent foreground pixels to its background model, a second
co-segmentation round, and a selection score that also penalised similarity to the photo's own background.

Masks are (H, W) bool {0,1} at each input's resolution; a single photo gives exactly `segment_grabcut`'s mask.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter

from far.grabcut import WORK_SIDE, _disk, _resize, border_band, clean_mask, coarse_mask, crop_letterbox, finish

LEVELS = 16  # colour histogram levels per channel (16^3 bins)
SHARED_SAMPLES = 20000  # foreground pixels the shared GMM is fitted to
AREA_RANGE = (0.01, 0.95)  # candidate masks outside this picture-area fraction are not chosen


def _bins(rgb: np.ndarray) -> np.ndarray:
    """(h, w) int: histogram bin of every pixel of an (h, w, 3) uint8 picture."""
    q = (rgb // (256 // LEVELS)).astype(np.int32)
    return (q[..., 0] * LEVELS + q[..., 1]) * LEVELS + q[..., 2]


def _hist(bins: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(LEVELS^3,) colour distribution of the masked pixels, smoothed (sigma 0.8 bins) so near colours match."""
    h = np.bincount(bins[mask], minlength=LEVELS**3).astype(np.float64).reshape((LEVELS,) * 3)
    h = gaussian_filter(h, 0.8).ravel()
    return h / max(h.sum(), 1e-12)


def _gmms(fg_bgr: np.ndarray, bg_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bgdModel, fgdModel), 1x65 float64 each: OpenCV's GrabCut GMMs fitted to (N, 3) BGR uint8 samples.

    grabCut with 0 iterations only initialises (k-means + fit) the models from a labelled image: a column of
    samples serves as that image."""
    px = np.concatenate([bg_bgr, fg_bgr]).astype(np.uint8)[:, None, :]
    labels = np.repeat(np.array([cv2.GC_BGD, cv2.GC_FGD], np.uint8), [len(bg_bgr), len(fg_bgr)])[:, None]
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(px), labels, None, bgd, fgd, 0, cv2.GC_INIT_WITH_MASK)
    return bgd, fgd


def _sample(px: np.ndarray, p: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Up to SHARED_SAMPLES rows of (N, 3) `px` drawn with probabilities `p` (N,); all rows where p is None."""
    if p is None or not len(px) or p.sum() <= 0:
        return px
    return px[rng.choice(len(px), size=min(SHARED_SAMPLES, len(px)), p=p / p.sum())]


def _frozen_cut(small: np.ndarray, coarse: np.ndarray, fg_bgr: np.ndarray, bg_weight: np.ndarray | None,
                rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool: one graph cut of `small` with a foreground GMM of `fg_bgr` and a background GMM of the pixels
    outside `coarse` (dilated 2 px; drawn by `bg_weight` (h, w) if given), neither re-learnt; the border band
    stays background."""
    bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
    outside = ~(cv2.dilate(coarse.astype(np.uint8), _disk(2)) > 0)
    bg_bgr = _sample(bgr[outside], None if bg_weight is None else bg_weight[outside], rng)
    if len(fg_bgr) < 10 or len(bg_bgr) < 10:
        return coarse
    bgd, fgd = _gmms(fg_bgr, bg_bgr)
    labels = np.where(coarse, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    labels[border_band(coarse.shape)] = cv2.GC_BGD
    cv2.grabCut(bgr, labels, None, bgd, fgd, 1, cv2.GC_EVAL_FREEZE_MODEL)
    return clean_mask(np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)))


def cosegment_coarse(smalls: list[np.ndarray], coarse: list[np.ndarray]) -> list[np.ndarray]:
    """Steps 2-4 of the module docstring on WORK_SIDE pictures `smalls` ((h_i, w_i, 3) RGB) and their first-pass
    masks `coarse` ((h_i, w_i) bool); returns the chosen (h_i, w_i) bool coarse mask per picture."""
    n = len(smalls)
    if n < 2:
        return list(coarse)
    rng = np.random.default_rng(0)
    bins = [_bins(s) for s in smalls]
    fg_h = [_hist(b, c) for b, c in zip(bins, coarse, strict=True)]
    bg_h = [_hist(b, ~c) for b, c in zip(bins, coarse, strict=True)]
    others_h = [np.mean([fg_h[k] for k in range(n) if k != i], axis=0) for i in range(n)]

    pools = []  # per photo: eroded first-pass foreground pixels (BGR) and their sampling probabilities
    for j in range(n):
        inner = cv2.erode(coarse[j].astype(np.uint8), _disk(2)) > 0
        bj = bins[j][inner]
        weight = others_h[j][bj] / (others_h[j][bj] + bg_h[j][bj] + 1e-12)
        pools.append((cv2.cvtColor(smalls[j], cv2.COLOR_RGB2BGR)[inner], weight / max(weight.sum(), 1e-12)))

    def shared(ids: list[int]) -> np.ndarray:
        return _sample(np.concatenate([pools[k][0] for k in ids]), np.concatenate([pools[k][1] for k in ids]), rng)

    chosen = []
    for i in range(n):
        b = bins[i]
        discounted = bg_h[i][b] / (bg_h[i][b] + others_h[i][b] + 1e-12)  # (h, w): unlike the subject elsewhere
        candidates = [coarse[i]]
        for ids in (list(range(n)), [k for k in range(n) if k != i]):
            fg = shared(ids)
            candidates += [_frozen_cut(smalls[i], coarse[i], fg, bg_weight, rng) for bg_weight in (None, discounted)]
        scores = [float(np.sqrt(_hist(bins[i], m) * others_h[i]).sum()) if AREA_RANGE[0] <= m.mean() <= AREA_RANGE[1]
                  else -1.0 for m in candidates]
        chosen.append(candidates[int(np.argmax(scores))])  # ties keep the first pass
    return chosen


def segment_concept(rgbs: list[np.ndarray]) -> list[np.ndarray]:
    """(H_i, W_i) bool {0,1} subject masks of (H_i, W_i, 3) uint8 RGB photos of one subject, co-segmented."""
    crops = [crop_letterbox(rgb) for rgb in rgbs]
    smalls = [_resize(picture, WORK_SIDE) for _, picture in crops]
    chosen = cosegment_coarse(smalls, [coarse_mask(s) for s in smalls])
    return [finish(rgb, box, picture, c) for rgb, (box, picture), c in zip(rgbs, crops, chosen, strict=True)]
