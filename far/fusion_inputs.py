"""Inputs of Concept Fusion, loaded and checked once: cut-outs, reference and prior images, backgrounds.

Reads the `segment` and `priors` manifests (same columns, see the brief / far/segment.py) and turns them
into in-memory assets that every example reuses, so the per-example work is only augmentation,
compositing and encoding. Everything that is expensive and example-independent happens here, once:
decoding, tight subject crops, and inpainting the subject out of every reference / prior image.

Choices the paper leaves open (ours):
- a prior image whose mask is flagged `empty` or `full` is still a `prior` row (prior preservation needs
  only image + prompt) but names no object: its `concepts`, `class_words` and `masks` are empty lists (a
  wrong mask would teach the class word's attention the wrong place). An `empty` one is also a
  background as it is; a `full` one is not a background;
- a class-prior image is a background only with its object inpainted away (else the composite would hold
  an extra, unnamed instance of the class).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from far.composite import crop_resize, inpaint_background, mask_bbox, resize, resize_mask, square_box
from far.config import ConceptsConfig, FusionConfig
from far.dataset import open_stage_parquet
from far.errors import InvalidInputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = ("concept", "class_word", "source", "image", "mask", "quality")
UNUSABLE_PRIOR = ("empty", "full")


class FusionInputError(InvalidInputError):
    """A segmented or prior input that Concept Fusion cannot use; the message names the file."""


@dataclass(frozen=True)
class ConceptInfo:
    name: str
    token: str
    class_word: str


@dataclass
class Subject:
    """A cut-out, cropped tight to its mask: (h, w, 3) uint8 RGB and (h, w) bool mask, h, w <= output side."""

    concept: str
    source: str
    rgb: np.ndarray
    mask: np.ndarray


@dataclass
class Photo:
    """A reference or prior image at the output size: (S, S, 3) uint8 RGB, (S, S) bool mask of its subject."""

    source: str
    rgb: np.ndarray
    mask: np.ndarray | None  # None: a prior whose segmentation found no usable object
    crop: tuple[int, int, int, int]  # the square taken from the original image (x0, y0, x1, y1)
    class_word: str = ""
    concept: str = ""
    prompt: str = ""


@dataclass
class Assets:
    """Everything the examples are made from, at output side `side`."""

    side: int
    concepts: list[ConceptInfo]
    subjects: dict[str, list[Subject]]  # concept name -> its cut-outs
    references: list[Photo]
    priors: list[Photo]  # one `prior` row each
    backgrounds: dict[str, list[tuple[str, np.ndarray]]] = field(default_factory=dict)  # source kind -> (id, rgb)
    skipped_priors: list[str] = field(default_factory=list)  # priors whose mask is not used


def read_manifest(folder: Path, what: str) -> list[dict]:
    """The rows of `<folder>/manifest.parquet`, checked for the columns Concept Fusion needs."""
    stage = "segment" if what == "segmented" else "priors"
    file = open_stage_parquet(Path(folder) / MANIFEST, MANIFEST_COLUMNS, f"{what} manifest", stage, FusionInputError)
    return file.read(columns=list(MANIFEST_COLUMNS)).to_pylist()


def _read_pair(folder: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB and (H, W) bool mask of one manifest row; errors name the file."""
    image_path, mask_path = folder / row["image"], folder / row["mask"]
    bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR) if image_path.is_file() else None
    if bgr is None:
        raise FusionInputError(f"{image_path}: missing or not a readable image (listed in {folder / MANIFEST})")
    gray = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) if mask_path.is_file() else None
    if gray is None:
        raise FusionInputError(f"{mask_path}: missing or not a readable mask (listed in {folder / MANIFEST})")
    if gray.shape != bgr.shape[:2]:
        raise FusionInputError(f"{mask_path}: mask is {gray.shape[::-1]} px but its image is {bgr.shape[1::-1]}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), gray >= 128


def _subject(concept: str, source: str, rgb: np.ndarray, mask: np.ndarray, side: int) -> Subject:
    """Tight crop of the subject, shrunk so its longer side is at most `side` (the largest it is ever used)."""
    box = mask_bbox(mask)
    assert box is not None
    x0, y0, x1, y1 = box
    crop_rgb, crop_mask = rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    factor = side / max(x1 - x0, y1 - y0)
    if factor < 1:
        size = (max(1, round((x1 - x0) * factor)), max(1, round((y1 - y0) * factor)))
        crop_rgb, crop_mask = resize(crop_rgb, size), resize_mask(crop_mask, size)
    return Subject(concept, source, np.ascontiguousarray(crop_rgb), np.ascontiguousarray(crop_mask))


def _photo(rgb: np.ndarray, mask: np.ndarray, side: int, **info: str) -> Photo:
    """Square crop centred on the subject, resized to side x side."""
    h, w = mask.shape
    box = mask_bbox(mask)
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) if box else None
    crop = square_box(w, h, centre)
    return Photo(rgb=crop_resize(rgb, crop, side), mask=resize_mask(mask[crop[1] : crop[3], crop[0] : crop[2]],
                 (side, side)), crop=crop, **info)


def _background(rgb: np.ndarray, mask: np.ndarray, side: int, dilate: float) -> np.ndarray:
    """The image with its subject inpainted away, centre-cropped square at side x side."""
    h, w = mask.shape
    clean = inpaint_background(rgb, mask, round(dilate * min(h, w))) if mask.any() else rgb
    return crop_resize(clean, square_box(w, h), side)


def load_assets(
    segmented: Path, priors: Path | None, concepts: ConceptsConfig, cfg: FusionConfig, side: int
) -> Assets:
    """Load and check every input; precompute cut-outs and backgrounds at output side `side`.

    `priors` may be None when neither `include_priors` nor a prior background weight needs it. Raises
    FusionInputError naming the file for a missing or corrupt manifest, image or mask, for a reference
    mask with no foreground, and naming the concept when a configured concept has no segmented image.
    """
    segmented = Path(segmented)
    infos = [ConceptInfo(c.name, c.token, c.class_word) for c in concepts.subjects]
    assets = Assets(side=side, concepts=infos, subjects={c.name: [] for c in infos}, references=[], priors=[])
    assets.backgrounds = {"reference": [], "prior": []}
    for row in read_manifest(segmented, "segmented"):
        if row["concept"] not in assets.subjects:
            continue  # segmented but not configured for this run
        rgb, mask = _read_pair(segmented, row)
        if not mask.any():
            raise FusionInputError(
                f"{segmented / row['mask']}: mask has no foreground (segmentation found no subject in "
                f"{row['source']}); fix or remove that image, or use another segment.backend"
            )
        if row["quality"] != "ok":
            log.warning("%s: segmentation quality is %r; using it anyway", segmented / row["mask"], row["quality"])
        assets.subjects[row["concept"]].append(_subject(row["concept"], row["source"], rgb, mask, side))
        assets.references.append(_photo(rgb, mask, side, source=row["source"], concept=row["concept"],
                                        class_word=row["class_word"]))
        assets.backgrounds["reference"].append((row["source"], _background(rgb, mask, side, cfg.inpaint_dilate)))
    empty = [name for name, subs in assets.subjects.items() if not subs]
    if empty:
        raise FusionInputError(f"{segmented / MANIFEST}: no segmented image for concept(s) {empty}")
    if priors is not None:
        _load_priors(Path(priors), assets, cfg, side)
    return assets


def _load_priors(folder: Path, assets: Assets, cfg: FusionConfig, side: int) -> None:
    for row in read_manifest(folder, "priors"):
        rgb, mask = _read_pair(folder, row)
        source = f"priors/{row['image']}"
        prompt = str(row["source"]).rsplit("|seed=", 1)[0]
        photo = _photo(rgb, mask, side, source=source, class_word=row["class_word"], prompt=prompt)
        if row["quality"] in UNUSABLE_PRIOR or not photo.mask.any():
            assets.skipped_priors.append(f"{source} ({row['quality']} mask)")
            photo.mask = None
        assets.priors.append(photo)
        if row["quality"] != "full":
            assets.backgrounds["prior"].append((source, _background(rgb, mask, side, cfg.inpaint_dilate)))
    if assets.skipped_priors:
        log.warning("prior rows without an object mask (mask unusable): %s", ", ".join(assets.skipped_priors))
