"""Subject finders: where the subjects are in a generated image, from its pixels alone (never attention maps).

Localized Refinement trains the concept tokens' attention maps, so a multi-concept verdict that locates the
subjects with those maps grades the training objective, not the image (issue 11). A finder sees only the image
(and the class words the prompt asks for) and returns instances; far/identity.py then assigns instances to
concepts by their similarity to each concept's references.

The interface, for any new finder (the world's oracle, for instance):

    class SubjectFinder(Protocol):
        label: str                                     # names the finder and its weights (reports/eval/backbones.json)
        def __call__(self, image: PIL.Image.Image | np.ndarray, classes: Sequence[str]) -> list[Subject]: ...

`image` is a PIL image or an (H, W, 3) uint8 RGB array; `classes` are the class words of the prompt's concepts
(an open-vocabulary detector's queries; a finder may ignore them). `make_finder` picks one by `eval.subject_finder`:

- `segment` (offline default): the `segment` stage's backend (`segment.backend`; u2netp where its weights are
  installed, else GrabCut) gives the image's foreground, split into 8-connected components; components smaller
  than `eval.min_subject_area` of the image are dropped. Two subjects that touch come out as ONE instance (then
  one concept goes unmatched): the finder cannot split them, and the metric says so rather than guessing.
- `owlv2`: an open-vocabulary detector through transformers (`eval.detector_model`, e.g.
  `google/owlv2-base-patch16-ensemble`, as MuDI's Detect-and-Compare), queried with "a photo of a <class>";
  boxes scoring at least `eval.detector_threshold`, class-agnostic NMS at IoU 0.5.
- `oracle` (the world only): the world oracle's subjects (far/world/oracle.py, weights `eval.oracle`) of the
  prompt's classes, with their masks; score = the oracle's confidence.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from far.config import EvalConfig, SegmentConfig
from far.errors import InvalidInputError

log = logging.getLogger(__name__)
NMS_IOU = 0.5  # detector boxes overlapping more than this are one subject (the higher score is kept)


@dataclass(frozen=True)
class Subject:
    """One subject found in an image."""

    bbox: tuple[int, int, int, int]  # pixels (x0, y0, x1, y1), exclusive end, inside the image
    score: float  # detector confidence in [0, 1] (owlv2), or the instance's share of the image area (segment)
    mask: np.ndarray | None = None  # (H, W) bool {0,1} at image resolution, where the finder gives one


class SubjectFinder(Protocol):
    """Finds subjects in an image from its pixels: `finder(image, classes) -> [Subject, ...]`."""

    label: str

    def __call__(self, image: Image.Image | np.ndarray, classes: Sequence[str]) -> list[Subject]: ...


def as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PIL image or an (H, W, 3) uint8 array."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidInputError(f"a subject finder needs an RGB image or (H, W, 3) uint8 array, got "
                                f"{rgb.dtype} {rgb.shape}")
    return rgb


def instances(foreground: np.ndarray, min_area: float) -> list[Subject]:
    """(H, W) bool foreground -> its 8-connected components covering >= `min_area` of the image, largest first."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(foreground.astype(np.uint8), connectivity=8)
    total = foreground.size
    out = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= min_area * total:
            out.append(Subject((x, y, x + w, y + h), area / total, labels == i))
    return sorted(out, key=lambda s: -s.score)


class SegmentFinder:
    """`eval.subject_finder: segment`: a foreground segmenter's mask split into instances."""

    def __init__(self, segment: Callable[[np.ndarray], np.ndarray], label: str, min_area: float):
        self._segment = segment  # (H, W, 3) uint8 -> (H, W) bool
        self.label = f"segment instances ({label}, min area {min_area:g})"
        self.min_area = min_area

    def __call__(self, image: Image.Image | np.ndarray, classes: Sequence[str] = ()) -> list[Subject]:
        return instances(self._segment(as_rgb(image)), self.min_area)


class Owlv2Finder:
    """`eval.subject_finder: owlv2`: OWLv2 boxes for "a photo of a <class>" (transformers)."""

    def __init__(self, model: str, threshold: float, device: str = "cpu"):
        import torch
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        self.processor, self.model = _load_pretrained((Owlv2Processor, Owlv2ForObjectDetection), model)
        self.model = self.model.float().eval().to(device)
        self.device = torch.device(device)
        self.threshold = threshold
        self.label = f"owlv2 {model} (threshold {threshold:g})"

    def __call__(self, image: Image.Image | np.ndarray, classes: Sequence[str]) -> list[Subject]:
        import torch
        from torchvision.ops import nms

        rgb = as_rgb(image)
        h, w = rgb.shape[:2]
        queries = [f"a photo of a {c}" for c in dict.fromkeys(classes)]
        if not queries:
            raise InvalidInputError("eval.subject_finder owlv2 needs the class words of the prompt's concepts")
        inputs = self.processor(text=[queries], images=Image.fromarray(rgb), return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        side = max(h, w)  # OWLv2 pads the image to a square (bottom / right): boxes are relative to that square
        found = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(side, side)])[0]
        boxes, scores = found["boxes"].float().cpu(), found["scores"].float().cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = nms(boxes, scores, NMS_IOU)
        out = []
        for box, score in zip(boxes[keep].tolist(), scores[keep].tolist(), strict=True):
            x0, y0, x1, y1 = int(box[0]), int(box[1]), int(np.ceil(box[2])), int(np.ceil(box[3]))
            if x1 > x0 and y1 > y0:
                out.append(Subject((x0, y0, x1, y1), float(score)))
        return out


def _load_pretrained(classes: tuple, model: str) -> list:
    """`cls.from_pretrained(model)` for each class: the local cache (or directory) first, the hub only if allowed."""
    from far.backbones import BackboneError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    error: Exception | None = None
    for local_only in (True, False) if not offline else (True,):
        try:
            return [cls.from_pretrained(model, local_files_only=local_only) for cls in classes]
        except Exception as exc:  # noqa: BLE001 - a cache miss raises OSError / ValueError depending on version
            error = exc
    raise BackboneError(
        f"eval.detector_model: {model!r} could not be loaded for eval.subject_finder owlv2 (needs its weights: "
        f"in the Hugging Face cache, a local directory, or a reachable hub): {error}. Without them use "
        f"eval.subject_finder: segment") from None


class OracleFinder:
    """`eval.subject_finder: oracle`: the subjects the world oracle reads, keeping those of the prompt's classes."""

    def __init__(self, oracle: Any):  # far.world.oracle.Oracle
        self.oracle = oracle
        self.label = f"oracle subjects ({oracle.label})"

    def __call__(self, image: Image.Image | np.ndarray, classes: Sequence[str] = ()) -> list[Subject]:
        (reading,) = self.oracle.read([as_rgb(image)])
        return [Subject(s.bbox, s.confidence, s.mask) for s in reading.subjects if not classes or s.cls in classes]


def make_finder(cfg: EvalConfig, segment: SegmentConfig, device: str = "cpu", oracle: Any = None) -> SubjectFinder:
    """The finder `eval.subject_finder` names (see the module docstring); `oracle`: an already loaded one."""
    if cfg.subject_finder == "oracle":
        from far.world.verdict import load_oracle

        return OracleFinder(oracle if oracle is not None else load_oracle(cfg.oracle))
    if cfg.subject_finder == "owlv2":
        return Owlv2Finder(cfg.detector_model, cfg.detector_threshold, device)
    from far.segment import Segmenter

    if segment.backend == "provided":
        raise InvalidInputError("eval.subject_finder segment cannot use segment.backend provided: generated images "
                                "have no masks beside them; use auto, rembg or grabcut")
    segmenter = Segmenter(segment)
    if segmenter.backend == "grabcut":  # far/grabcut.py keeps the largest piece: built for one-subject photos
        log.warning("eval.subject_finder segment with the GrabCut backend finds at most one main subject per image, "
                    "so multi-concept identity undercounts; install u2netp (`far weights`) or use owlv2")
    return SegmentFinder(segmenter, segmenter.label, cfg.min_subject_area)
