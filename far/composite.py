"""Pixel operations of Concept Fusion: square crops, feathered alpha, occlusion-correct pasting, placement.

Pure numpy/OpenCV on uint8 arrays, no I/O, so every step is cheap enough for >= 100 composites/s at
512 px on 2 cores and testable on its own. Conventions: images are (H, W, 3) uint8 RGB; binary masks are
(H, W) bool, {0,1}, at the resolution of the image they belong to; alphas are (H, W) float32 in [0, 1].

Choices the paper leaves open (ours):
- feathering is *inside* the mask: alpha = blur(erode(mask)) * mask, so a cut-out fades out over a few
  pixels without ever bringing back the pixels of its original background around the mask;
- occlusion: subjects are pasted bottom to top and every pixel belongs to the topmost subject whose
  binary mask covers it, so the stored masks are disjoint and the occluded part leaves the lower mask;
- scale is the subject's longer bounding-box side as a fraction of the output side.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive end)


def mask_bbox(mask: np.ndarray) -> Box | None:
    """Tight bounding box of a (H, W) bool mask, or None when it has no foreground."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height): area averaging when shrinking (no aliasing), bilinear when enlarging."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if size[0] * size[1] < w * h else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (H, W) bool mask to (width, height); area-weighted, foreground where >= half covered."""
    return resize(mask.astype(np.uint8) * 255, size) >= 128


def square_box(width: int, height: int, center: tuple[float, float] | None = None) -> Box:
    """The largest square inside a width x height image, centred on `center` (clipped), else the image centre.

    Used for reference and background crops: centring on the subject keeps it in frame where a plain
    centre crop of a landscape photo could cut it off.
    """
    side = min(width, height)
    cx, cy = center if center is not None else (width / 2, height / 2)
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2, 0), height - side)))
    return x0, y0, x0 + side, y0 + side


def crop_resize(image: np.ndarray, box: Box, size: int) -> np.ndarray:
    """Crop `box` out of `image` and resize it to size x size."""
    x0, y0, x1, y1 = box
    return resize(np.ascontiguousarray(image[y0:y1, x0:x1]), (size, size))


def inpaint_background(rgb: np.ndarray, mask: np.ndarray, dilate: int, work_side: int = 256) -> np.ndarray:
    """The image with its subject removed: Telea inpainting of the dilated (H, W) bool mask.

    Inpainting runs at most at `work_side` px on the shorter side (its cost grows with the hole's area;
    the filled region is smooth anyway) and only the hole is taken from that result, so the rest of the
    background keeps its full resolution. `dilate` (px at full resolution) also removes the subject's
    halo and shadow edge that segmentation leaves behind.
    """
    h, w = mask.shape
    hole = mask.astype(np.uint8) * 255
    if dilate > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1))
        hole = cv2.dilate(hole, kernel)
    factor = min(1.0, work_side / min(h, w))
    small = (max(1, round(w * factor)), max(1, round(h * factor)))
    small_rgb = resize(rgb, small)
    small_hole = cv2.resize(hole, small, interpolation=cv2.INTER_NEAREST)
    filled = cv2.inpaint(small_rgb, small_hole, inpaintRadius=5, flags=cv2.INPAINT_TELEA)
    out = rgb.copy()
    inside = hole > 0
    out[inside] = cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR)[inside]
    return out


def feathered_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """Soft (H, W) float32 alpha in [0, 1] from a (H, W) bool mask; zero outside the mask.

    The mask is eroded by feather/2 and blurred with a (2*feather+1) kernel, so the alpha ramps from ~0 at
    the mask edge to 1 about `feather` px inside; multiplying by the mask keeps alpha > 0 only where the
    stored binary mask says "subject".
    """
    m = mask.astype(np.float32)
    if feather <= 0:
        return m
    r = max(1, feather // 2)
    eroded = cv2.erode(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    k = 2 * feather + 1
    return np.minimum(cv2.GaussianBlur(eroded, (k, k), 0), 1.0) * m


@dataclass
class Layer:
    """A transformed subject ready to paste: (h, w, 3) uint8 RGB, (h, w) bool mask, (h, w) float32 alpha."""

    rgb: np.ndarray
    mask: np.ndarray
    alpha: np.ndarray
    x: int = 0  # top-left corner on the canvas (the layer lies fully inside it)
    y: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return self.mask.shape[1], self.mask.shape[0]

    def canvas_mask(self, side: int) -> np.ndarray:
        """The layer's binary mask placed on a side x side canvas, (side, side) bool."""
        out = np.zeros((side, side), bool)
        w, h = self.size
        out[self.y : self.y + h, self.x : self.x + w] = self.mask
        return out


def visible_masks(layers: list[Layer], side: int) -> list[np.ndarray]:
    """One (side, side) bool mask per layer (z-order, bottom first): the part of its mask that no layer above
    covers. Pairwise disjoint by construction: every pixel belongs to the topmost layer whose mask covers it."""
    masks = [layer.canvas_mask(side) for layer in layers]
    covered = np.zeros((side, side), bool)
    for m in reversed(masks):  # top to bottom: remove what the layers above already own
        m &= ~covered
        covered |= m
    return masks


def composite(background: np.ndarray, layers: list[Layer]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paste `layers` bottom (first) to top (last) onto a (S, S, 3) uint8 background.

    Returns the (S, S, 3) uint8 image and `visible_masks(layers)`: one (S, S) bool mask per layer, same order,
    the part of each layer's mask not covered by any layer above it.
    """
    canvas = background.copy()
    for layer in layers:
        w, h = layer.size
        roi = canvas[layer.y : layer.y + h, layer.x : layer.x + w]
        # roi * (1 - alpha) + rgb * alpha, per pixel, rounded to uint8 (one OpenCV call: fast)
        roi[...] = cv2.blendLinear(roi, layer.rgb, 1.0 - layer.alpha, layer.alpha)
    return canvas, visible_masks(layers, background.shape[0])


def place_layers(
    layers: list[Layer], side: int, rng: np.random.Generator, max_overlap: float, tries: int
) -> list[float]:
    """Choose each layer's position on a side x side canvas so that no layer loses more than `max_overlap`
    of its mask area to the layers above it (layers are in z-order, bottom first).

    Each layer gets up to `tries` uniformly random positions (fully inside the canvas); the first that keeps
    every lower layer within the bound wins, else the one with the smallest worst occlusion. Sets `x`, `y`
    in place and returns each layer's final occluded fraction (0 for the top layer).
    """
    placed: list[np.ndarray] = []  # canvas masks of the layers placed so far
    areas: list[int] = []
    for layer in layers:
        w, h = layer.size
        best: tuple[float, int, int] | None = None
        for _ in range(max(1, tries)):
            x = int(rng.integers(0, side - w + 1))
            y = int(rng.integers(0, side - h + 1))
            layer.x, layer.y = x, y
            new = layer.canvas_mask(side)
            worst = 0.0
            above = new.copy()
            for m, area in zip(reversed(placed), reversed(areas), strict=True):  # nearest lower layer first
                worst = max(worst, float(np.count_nonzero(m & above)) / area)
                above |= m
            if best is None or worst < best[0]:
                best = (worst, x, y)
            if worst <= max_overlap:
                break
        assert best is not None
        layer.x, layer.y = best[1], best[2]
        placed.append(layer.canvas_mask(side))
        areas.append(max(1, int(np.count_nonzero(layer.mask))))
    masks = visible_masks(layers, side)
    return [1.0 - float(np.count_nonzero(m)) / a for m, a in zip(masks, areas, strict=True)]


def plate(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural (side, side, 3) uint8 background: `plain` (one colour, faint vertical shading),
    `gradient` (two colours along a random direction), `noise` (smooth low-frequency colour noise) or
    `world` (one of the world's named backgrounds, far/world/render.py, with a random texture seed)."""
    if kind == "world":
        from far.world.render import render_background
        from far.world.vocab import BACKGROUNDS

        name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        img = render_background(name, side, int(rng.integers(2**31)))
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    small = max(2, side // 8)  # smooth plates are made small and upscaled: same look, a fraction of the work
    if kind == "plain":
        shade = np.linspace(1.06, 0.94, small, dtype=np.float32)[:, None, None]
        img = np.broadcast_to(c0 * shade, (small, small, 3))
    elif kind == "gradient":
        c1 = rng.uniform(0, 255, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        t = np.linspace(-0.5, 0.5, small, dtype=np.float32)
        ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]  # (small, small)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        img = c0 + (c1 - c0) * ramp[..., None]
    elif kind == "noise":
        cells = int(rng.integers(3, 9))
        low = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
        img = cv2.resize(low, (small, small), interpolation=cv2.INTER_CUBIC)
    else:
        raise ValueError(f"unknown plate kind {kind!r} (plain | gradient | noise | world)")
    small_u8 = np.clip(img, 0, 255).astype(np.uint8)
    return cv2.resize(small_u8, (side, side), interpolation=cv2.INTER_LINEAR)


def draw_outlines(rgb: np.ndarray, masks: list[np.ndarray], colours: list[tuple[int, int, int]]) -> np.ndarray:
    """A copy of (H, W, 3) uint8 `rgb` with each (H, W) bool mask's outline drawn in its colour."""
    out = rgb.copy()
    thickness = max(1, rgb.shape[0] // 160)
    for mask, colour in zip(masks, colours, strict=True):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, thickness)
    return out
