"""far/io.py: outputs appear whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from far.io import atomic_dir, atomic_file, write_json


def test_atomic_dir_replaces_only_on_success(tmp_path: Path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_cleans_leftovers_of_a_killed_run(tmp_path: Path):
    leftover = tmp_path / ".out.tmp-abc123"
    leftover.mkdir()
    (leftover / "partial").write_text("x")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_and_deterministic_json(tmp_path: Path):
    path = tmp_path / "m.json"
    write_json(path, {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError), atomic_file(path) as tmp:
        tmp.write_text("garbage")
        raise ValueError
    assert path.read_text().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
