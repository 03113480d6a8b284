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


def test_a_stage_run_removes_what_a_killed_run_of_it_left_and_nothing_else(tmp_path: Path):
    from stages import remove_stale_temporaries
    from tests.conftest import ROOT

    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    fuse_dir, fuse_file = tmp_path / "data/.fusion.tmp-a1", tmp_path / "data/.fusion.tmp-b2"
    page, metrics = tmp_path / "reports/.index.html.tmp-c3", tmp_path / "reports/.metrics.json.tmp-d4"
    others = [tmp_path / "data/.segmented.tmp-e5", tmp_path / "data/.samples.partial", tmp_path / "data/fusion"]
    for d in (fuse_dir, others[0], others[1], others[2]):
        d.mkdir(parents=True)
        (d / "partial").write_text("x")
    for f in (fuse_file, page, metrics):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("half")
    assert remove_stale_temporaries("fuse", tmp_path) == [fuse_dir, fuse_file]
    assert remove_stale_temporaries("evaluate", tmp_path) == [metrics]  # a metrics file (cache: false)
    assert remove_stale_temporaries("report", tmp_path) == [page]
    assert not any(p.exists() for p in (fuse_dir, fuse_file, page, metrics))
    assert all((d / "partial").is_file() for d in others)  # another stage's, sample's resume dir, the output
    assert remove_stale_temporaries("fuse", tmp_path / "elsewhere") == []  # no dvc.yaml: run by hand
