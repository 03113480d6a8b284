"""far/dataset.py: the fusion Parquet contract round-trips, streams and is deterministic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from far.dataset import (
    COLUMNS,
    decode_image,
    decode_mask,
    encode_jpeg,
    encode_png,
    iter_rows,
    open_training_set,
    write_training_set,
)
from far.errors import InvalidInputError


def _rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
        mask = np.zeros((64, 48), bool)
        mask[10 : 20 + i, 5:30] = True
        rows.append({
            "id": f"fusion-{i:04d}", "kind": "fusion", "image": encode_png(image), "width": 48, "height": 64,
            "prompt": "a photo of a <a> dog", "concepts": ["a"], "class_words": ["dog"],
            "masks": [encode_png(mask)], "sources": ["a/00.jpg"], "augment": {"scale": 0.5 + i / 10}, "seed": i,
        })
    return rows


def test_round_trip_with_plain_pandas(tmp_path: Path):
    rows = _rows(5)
    path = tmp_path / "train.parquet"
    assert write_training_set(rows, path, row_group_size=2) == 5
    frame = pd.read_parquet(path)
    assert tuple(frame.columns) == COLUMNS and len(frame) == 5
    assert open_training_set(path).num_row_groups == 3
    streamed = list(iter_rows(path))
    assert [r["id"] for r in streamed] == [r["id"] for r in rows]
    assert np.array_equal(decode_image(streamed[2]["image"]), decode_image(rows[2]["image"]))
    mask = decode_mask(streamed[3]["masks"][0])
    assert mask.dtype == bool and mask.sum() == (23 - 10) * 25
    assert streamed[1]["augment"] == '{"scale": 0.6}'


def test_same_rows_give_identical_bytes(tmp_path: Path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_training_set(_rows(4), a)
    write_training_set(_rows(4), b)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_jpeg_round_trip_is_close():
    image = np.full((32, 32, 3), (200, 30, 90), np.uint8)
    assert np.abs(decode_image(encode_jpeg(image)).astype(int) - image).max() <= 3


def test_bad_rows_fail_and_leave_no_file(tmp_path: Path):
    rows = _rows(3)
    rows[2]["masks"] = []
    path = tmp_path / "train.parquet"
    with pytest.raises(InvalidInputError, match="fusion-0002.*1 concepts, 1 class words and 0 masks"):
        write_training_set(rows, path)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_file_is_named(tmp_path: Path):
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(InvalidInputError, match="train.parquet: corrupt training set, not a readable Parquet"):
        open_training_set(bad)
    with pytest.raises(InvalidInputError, match="run the `fuse` stage"):
        open_training_set(tmp_path / "missing.parquet")
