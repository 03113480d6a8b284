"""Robust loading of reference images: every odd-but-valid file becomes plain 8-bit RGB, every bad one a clear error.

Used by the segment stage (and by anything else that reads user photos). Choices (ours, documented in the README):
- EXIF orientation is applied, so the array is the image as a viewer shows it.
- Images with alpha (RGBA, LA, palette with transparency) are composited on WHITE: a cut-out product shot then
  looks like a studio photo; dropping alpha instead would expose whatever colour the transparent pixels happen
  to store (often black or garbage).
- 16-bit images (`I;16` grayscale, 48-bit RGB PNG) are scaled to 8 bits by /257 (65535 -> 255), not truncated.
- CMYK (including Adobe's inverted JPEGs, which PIL handles) is converted with PIL's conversion.
- Images with a side under `MIN_SIDE` (64) pixels are rejected: the UNet's smallest attention maps would be
  under one pixel per latent cell.
- Duplicates are found by a hash of the decoded pixels (so the same photo saved twice, or re-encoded
  losslessly, is caught); `on_bad_image: skip` keeps the first one in sorted order and warns.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from far.errors import InvalidInputError

log = logging.getLogger(__name__)

MIN_SIDE = 64
OnBad = Literal["error", "skip"]


class BadImageError(InvalidInputError):
    """A reference image that cannot be used (corrupt, not an image, too small, duplicated)."""


@dataclass(frozen=True)
class LoadedImage:
    path: Path
    rgb: np.ndarray  # (H, W, 3) uint8
    digest: str  # sha256 of shape + pixels


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale integer/float pixel data of any depth to uint8 (16-bit: /257, float: [0,1] or [0,255])."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    arr = arr.astype(np.int64)
    if arr.size and arr.max() > 255:  # 16-bit data (PIL keeps I;16 and 16-bit PNG grayscale as I/I;16)
        return np.clip((arr + 128) // 257, 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL mode; alpha is composited on white."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if im.mode.startswith("I") or im.mode == "F":
        gray = _to_uint8(np.asarray(im))
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV
    return np.asarray(im)


def load_rgb(path: Path | str, min_side: int = MIN_SIDE) -> np.ndarray:
    """Load an image file as (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises BadImageError naming the file for: a missing file, a non-image file, a corrupt or truncated
    file, or an image whose shorter side is under `min_side` pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()  # decodes everything: truncated data raises here, not later
            im = ImageOps.exif_transpose(im)
            rgb = _pil_to_rgb(im)
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image file (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{path}: corrupt or truncated image ({exc})") from None
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise BadImageError(f"{path}: image is {w}x{h} px; the shorter side must be at least {min_side} px")
    return np.ascontiguousarray(rgb)


def pixel_digest(rgb: np.ndarray) -> str:
    """sha256 of an image's shape and pixels: equal for the same picture whatever the file encoding."""
    h = hashlib.sha256(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def list_images(folder: Path | str, exclude_suffix: str | None = None) -> list[Path]:
    """Candidate reference files of a concept folder: every regular, non-hidden file, sorted by name.

    Files ending in `exclude_suffix` (the `provided` masks, e.g. `_mask.png`) and `.json` sidecars (a world
    concept's `world.json`, far/world/concepts.py) are not candidates. Raises InvalidInputError naming the
    folder if it does not exist or holds no candidate file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: concept image folder does not exist")
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".json"
        and not (exclude_suffix and p.name.endswith(exclude_suffix))
    )
    if not files:
        raise InvalidInputError(f"{folder}: concept image folder is empty (no reference images)")
    return files


def _bad(msg: str, on_bad_image: OnBad) -> None:
    if on_bad_image == "error":
        raise BadImageError(msg)
    log.warning("skipping: %s", msg)  # logging's last-resort handler prints it to stderr


def load_folder(
    folder: Path | str, on_bad_image: OnBad = "error", exclude_suffix: str | None = None, min_side: int = MIN_SIDE
) -> list[LoadedImage]:
    """Load every reference image of a concept folder (sorted by file name).

    Bad files (corrupt, non-image, too small) and duplicates (same pixels as an earlier file) raise
    BadImageError naming the file, or with `on_bad_image="skip"` are left out with a warning. A folder with
    no usable image left raises InvalidInputError naming the folder either way.
    """
    folder = Path(folder)
    loaded: list[LoadedImage] = []
    seen: dict[str, Path] = {}
    for path in list_images(folder, exclude_suffix):
        try:
            rgb = load_rgb(path, min_side=min_side)
        except BadImageError as exc:
            _bad(str(exc), on_bad_image)
            continue
        digest = pixel_digest(rgb)
        if digest in seen:
            _bad(f"{path}: duplicate of {seen[digest]} (identical pixels)", on_bad_image)
            continue
        seen[digest] = path
        loaded.append(LoadedImage(path, rgb, digest))
    if not loaded:
        raise InvalidInputError(f"{folder}: no usable reference image left (all were skipped as bad)")
    return loaded
