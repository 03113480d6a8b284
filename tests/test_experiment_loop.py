"""The researcher's loop as the README documents it, under real DVC in a temporary git repository (issue 14):
the default run committed as the baseline (the session's `reference` run, tests/pipeline_fixtures.py), one
experiment run at once, one queued, then compare; the workspace params stay the default throughout.
Each experiment changes one `eval` param, so only evaluate and report re-run: the loop is tested, not training."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import run
from tests.pipeline_fixtures import DVC, stages_run

pytestmark = pytest.mark.slow

EXPERIMENTS = {"threshold": ("region_threshold", 0.4), "padding": ("crop_padding", 0.2)}


def _numbers(obj, prefix: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _numbers(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj} if isinstance(obj, int | float) and not isinstance(obj, bool) else {}


def _set(name: str) -> list[str]:
    key, value = EXPERIMENTS[name]
    return ["-n", name, "-S", f"eval.{key}={value}"]


def test_baseline_experiment_queued_experiment_compare_and_params_stay_default(reference, tmp_path: Path):
    project = Path(shutil.copytree(reference[0], tmp_path / "project", symlinks=True))
    default = (project / "params.yaml").read_bytes()
    # 1. the baseline: the default run with dvc.lock and both metrics files committed
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], project).stdout == ""
    baseline = _numbers(json.loads((project / "reports/metrics.json").read_text()))
    assert {"overall.clip_t", "overall.dino", "multi_concept.identity_accuracy"} <= set(baseline), baseline

    # 2. one experiment now (--temp: outside the workspace), one queued, then the queue run
    out = run(DVC + ["exp", "run", "--temp", *_set("threshold")], project).stdout
    assert stages_run(out) == ["evaluate", "report"], out
    run(DVC + ["exp", "run", "--queue", *_set("padding")], project)
    run(DVC + ["queue", "start"], project)
    status = ""
    for _ in range(200):  # the queue worker runs in the background: wait until it has finished (or failed)
        status = next((line for line in run(DVC + ["queue", "status"], project).stdout.splitlines()
                       if " padding " in f" {line} "), "")
        if status.endswith(("Success", "Failed")):
            break
        time.sleep(3)
    assert status.endswith("Success"), status + run(DVC + ["queue", "logs", "padding"], project, check=False).stdout
    assert (project / "params.yaml").read_bytes() == default  # the workspace is still the default

    # 3. compare: the baseline and both experiments, each with every metric
    shown = json.loads(run(DVC + ["exp", "show", "--json"], project).stdout)
    head = next(c for c in shown if c["rev"] != "workspace")
    exps = {e["name"]: e["revs"][0] for e in head.get("experiments") or []}
    assert set(EXPERIMENTS) <= set(exps), exps
    for rev, changed in [(head, None), *((exps[name], EXPERIMENTS[name]) for name in EXPERIMENTS)]:
        metrics = rev["data"]["metrics"]["reports/metrics.json"]["data"]
        assert set(_numbers(metrics)) == set(baseline), rev.get("name")
        if changed:
            key, value = changed
            assert rev["data"]["params"]["params.yaml"]["data"]["eval"][key] == value
    for name in EXPERIMENTS:
        diff = json.loads(run(DVC + ["metrics", "diff", "HEAD", name, "--json", "--all"], project).stdout)
        rows = diff["reports/metrics.json"]
        assert set(baseline) <= set(rows), sorted(set(baseline) - set(rows))
        assert all(rows[k]["old"] == baseline[k] and rows[k]["new"] is not None for k in baseline), rows
