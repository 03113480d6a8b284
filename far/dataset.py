"""The fusion Parquet: the training set's data contract (DESIGN.md), its writer and a streaming reader.

One row per training example. Images and masks are stored encoded (PNG/JPEG bytes) so the file is
readable with plain `pandas.read_parquet` / `pyarrow` and small enough to stream by row group.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from far.errors import InvalidInputError
from far.io import atomic_file

KINDS = ("reference", "single", "fusion", "prior")

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # one of KINDS
        pa.field("image", pa.binary(), nullable=False),  # encoded RGB (PNG or JPEG)
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("concepts", pa.list_(pa.string()), nullable=False),  # concept names in the image
        pa.field("class_words", pa.list_(pa.string()), nullable=False),  # same order as `concepts`
        pa.field("masks", pa.list_(pa.binary()), nullable=False),  # PNG, {0,255}, one per concept
        pa.field("sources", pa.list_(pa.string()), nullable=False),  # ids/paths of what made the row
        pa.field("augment", pa.string(), nullable=False),  # JSON: the augmentation parameters used
        pa.field("seed", pa.int64(), nullable=False),
    ]
)
COLUMNS = tuple(SCHEMA.names)
# Encoded images and masks are already compressed: zstd would gain ~2% size for most of the writer's time.
COMPRESSION = {name: "none" if name in ("image", "masks") else "zstd" for name in COLUMNS}


def encode_png(array: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of an (H, W, 3) RGB uint8 image or an (H, W) uint8/bool mask.

    OpenCV's encoder at a low compression level is ~10x faster than PIL's default and still lossless.
    """
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise ValueError(f"could not PNG-encode an array of shape {array.shape}")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an (H, W, 3) RGB uint8 image."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not JPEG-encode an array of shape {rgb.shape}")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) RGB uint8 from encoded bytes."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("undecodable image bytes")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_mask(data: bytes) -> np.ndarray:
    """(H, W) bool mask, {0,1}, from PNG bytes (foreground where the stored value is >= 128)."""
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise ValueError("undecodable mask bytes")
    return gray >= 128


def _check_row(row: dict[str, Any], index: int) -> None:
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise InvalidInputError(f"training row {index} ({row.get('id')!r}) lacks columns {missing}")
    if row["kind"] not in KINDS:
        raise InvalidInputError(f"training row {row['id']!r}: kind {row['kind']!r} is not one of {KINDS}")
    if not (len(row["concepts"]) == len(row["masks"]) == len(row["class_words"])):
        raise InvalidInputError(
            f"training row {row['id']!r}: {len(row['concepts'])} concepts, {len(row['class_words'])} class words "
            f"and {len(row['masks'])} masks (must be equal)"
        )


def write_training_set(rows: Iterable[dict[str, Any]], path: Path | str, row_group_size: int = 64) -> int:
    """Write rows (dicts with every column of SCHEMA) to `path` atomically; returns the row count.

    Rows are buffered one row group at a time, so memory stays bounded. Given the same rows, the file is
    byte-identical (no timestamps or pandas metadata are written).
    """
    count = 0
    with atomic_file(path) as tmp:
        with pq.ParquetWriter(tmp, SCHEMA, compression=COMPRESSION, write_statistics=["id", "kind"]) as writer:
            batch: list[dict[str, Any]] = []
            for row in rows:
                _check_row(row, count)
                if not isinstance(row["augment"], str):
                    row = {**row, "augment": json.dumps(row["augment"], sort_keys=True)}
                batch.append(row)
                count += 1
                if len(batch) == row_group_size:
                    writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA), row_group_size=row_group_size)
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA), row_group_size=row_group_size)
    return count


def open_stage_parquet(
    path: Path | str, columns: Sequence[str], what: str, stage: str, error: type[InvalidInputError] = InvalidInputError
) -> pq.ParquetFile:
    """Open a stage's Parquet output (metadata only), checked: it exists, is readable and has `columns`.

    Errors name the file, what it should be and the stage that makes it.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found (run the `{stage}` stage)")
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise error(f"{path}: corrupt {what}, not a readable Parquet file ({exc})") from None
    missing = [c for c in columns if c not in file.schema_arrow.names]
    if missing:
        raise error(f"{path}: {what} is missing columns {missing} (has {file.schema_arrow.names})")
    return file


def open_training_set(path: Path | str) -> pq.ParquetFile:
    """Open the training Parquet, checking it has the fusion data contract's columns."""
    return open_stage_parquet(path, COLUMNS, "training set", "fuse")


def iter_rows(path: Path | str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Stream rows as dicts, one row group in memory at a time."""
    file = open_training_set(path)
    for i in range(file.num_row_groups):
        yield from file.read_row_group(i, columns=columns).to_pylist()
