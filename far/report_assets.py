"""Pictures for the HTML report: thumbnails, mask outlines, attention heat maps, oracle boxes, loss curves.

Every function writes one local file (JPEG for photos, PNG for masks and plots) and returns nothing; the
report links them relatively, so the page opens offline from any location.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

# Distinct, colour-blind-safe outline colours (Okabe-Ito), one per concept in a picture.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167),
)

# The world oracle's boxes by what the subject is (far/report_world.py `oracle_figure`): far from every colour the world
# paints subjects and backgrounds with (far/world/vocab.py), and drawn on a black rim, so a box shows on any of them.
BOX_COLOURS: dict[str, tuple[int, int, int]] = {
    "concept": (0, 255, 255), "mix": (255, 0, 255), "other": (255, 255, 255),
}


def fit(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3|1) uint8 scaled so its longest side is at most `size` (never enlarged)."""
    h, w = rgb.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale == 1.0:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def enlarge(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 scaled so its longest side is `size`: up by nearest neighbour (a 64 px sample's pixels
    stay crisp squares), down as `fit` does."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    if scale <= 1.0:
        return fit(rgb, size)
    return cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_NEAREST)


def boxes(rgb: np.ndarray, items: Sequence[tuple[Sequence[float], tuple[int, int, int]]], size: int) -> np.ndarray:
    """`rgb` (H, W, 3) enlarged to `size` (`enlarge`), each (bbox, colour) drawn on it as a box.

    bbox: [x0, y0, x1, y1] in `rgb`'s pixels, x1 and y1 exclusive. The colour lies just inside the box's edges
    (so the pixel at (x0, y0), scaled, is the colour), with a one-pixel black rim on either side of it.
    """
    out = enlarge(rgb, size)
    sx, sy = out.shape[1] / rgb.shape[1], out.shape[0] / rgb.shape[0]
    width = max(2, round(max(out.shape[:2]) / 96))  # 3 px at 256
    im = Image.fromarray(out)
    draw = ImageDraw.Draw(im)
    for (x0, y0, x1, y1), colour in items:
        a, b = round(x0 * sx), round(y0 * sy)
        c, d = max(a, round(x1 * sx) - 1), max(b, round(y1 * sy) - 1)  # PIL's corners are inclusive
        draw.rectangle((a - 1, b - 1, c + 1, d + 1), outline=(0, 0, 0), width=width + 2)
        draw.rectangle((a, b, c, d), outline=colour, width=width)
    return np.asarray(im)


def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (EXIF orientation applied, as the segment stage does)."""
    from PIL import ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def save_jpeg(rgb: np.ndarray, path: Path, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=quality)


def outline(rgb: np.ndarray, masks: list[np.ndarray], tint: float = 0.25) -> np.ndarray:
    """`rgb` with each {0,1} mask (same H, W) tinted and outlined in its own PALETTE colour."""
    out = rgb.astype(np.float32)
    thickness = max(1, round(max(rgb.shape[:2]) / 160))
    for i, mask in enumerate(masks):
        color = np.array(PALETTE[i % len(PALETTE)], np.float32)
        m = mask.astype(bool)
        out[m] = (1 - tint) * out[m] + tint * color
    out = out.clip(0, 255).astype(np.uint8)
    for i, mask in enumerate(masks):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, PALETTE[i % len(PALETTE)], thickness)
    return out


def heat_overlay(rgb: np.ndarray, attention: np.ndarray, alpha: float) -> np.ndarray:
    """`rgb` (H, W, 3) with a soft map (S, S), any range, upsampled bilinearly and drawn as a heat map.

    The map is stretched to [0, 1] for display (min -> dark, max -> bright), so the picture shows where a
    token attends, not how strongly compared with other maps.
    """
    from matplotlib import colormaps

    m = attention.astype(np.float32)
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    m = cv2.resize(m, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)  # (H, W)
    heat = (colormaps["turbo"](m)[..., :3] * 255).astype(np.float32)
    return ((1 - alpha) * rgb.astype(np.float32) + alpha * heat).clip(0, 255).astype(np.uint8)


def loss_curve(steps: np.ndarray, values: np.ndarray, title: str, path: Path) -> None:
    """A small PNG: the raw curve (thin) and, for long curves, its exponential moving average (thick)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; deterministic raster output
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.4, 2.7), dpi=110)
    few = len(values) <= 20  # sparse logs (e.g. every 10 steps): show the points themselves
    ax.plot(steps, values, color="#1f5f99" if few else "#9bb7d4", linewidth=1, label="raw",
            marker="o" if few else None, markersize=3)
    if len(values) > 20:
        ema = np.empty_like(values, dtype=np.float64)
        acc = float(values[0])
        for i, v in enumerate(values):
            acc = 0.9 * acc + 0.1 * float(v)
            ema[i] = acc
        ax.plot(steps, ema, color="#1f5f99", linewidth=2, label="EMA 0.9")
        ax.legend(frameon=False, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
