"""The whole pipeline under real DVC, once per test session: shared by tests/test_end_to_end.py and
tests/test_experiment_loop.py (the `reference` fixture in tests/conftest.py).

The project copy uses a smaller (but complete) setting of the same params: fewer steps, examples and
samples. Every stage still runs its real code.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import yaml

from tests.conftest import make_project_copy, run

DVC = [sys.executable, "-m", "dvc"]
STAGES = ["base_model", "segment", "priors", "fuse", "train", "sample", "evaluate", "report"]
# dotted key -> value; a key that no longer exists fails loudly instead of silently testing defaults
FAST = {
    "priors.per_class": 2,
    "fusion.num_single": 6,
    "fusion.num_multi": 8,
    "train.steps": 12,
    "train.checkpoint_every": 4,
    "sample.seeds": [0],
}
# What the documented baseline commit holds (README, "Ablations and experiments").
BASELINE_FILES = ["dvc.lock", "reports/metrics.json", "dvclive/metrics.json"]


def _set(params: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    if leaf not in node:
        raise KeyError(f"params.yaml has no key {dotted!r}: update tests/pipeline_fixtures.py FAST")
    node[leaf] = value


def fast_project(dest: Path) -> Path:
    project = make_project_copy(dest)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in FAST.items():
        _set(params, key, value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "fast params for tests"], project)
    return project


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def sha256(path: Path) -> str:
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
        return digest.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def results(project: Path) -> dict[str, str]:
    """Hashes of the outputs that must be identical between runs (on CPU)."""
    return {
        "fusion": sha256(project / "data/fusion/train.parquet"),
        "delta": sha256(project / "models/far/delta.safetensors"),
        "metrics": json.dumps(json.loads((project / "reports/metrics.json").read_text()), sort_keys=True),
    }


def reference_run(dest: Path) -> tuple[Path, dict[str, str]]:
    """One uninterrupted full run, committed as the baseline as the README says; returns (project, results)."""
    project = fast_project(dest)
    out = run(DVC + ["repro"], project).stdout
    assert stages_run(out) == STAGES, out
    run(["git", "add", *BASELINE_FILES], project)
    run(["git", "commit", "-qm", "baseline: the default run"], project)
    return project, results(project)
