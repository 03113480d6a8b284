"""The researcher's loop as the README documents it, under real DVC in a temporary git repository (issue 14):
the default run committed as the baseline, one experiment run at once, one queued, then compare; the workspace
params stay the default throughout. The tiny model and small counts keep it to a few minutes of CPU."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project_copy, run

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
SMALL = {("model", "pretrained"): "tiny", ("priors", "per_class"): 1, ("fusion", "num_single"): 4,
         ("fusion", "num_multi"): 4, ("train", "steps"): 4, ("train", "checkpoint_every"): 4,
         ("sample", "seeds"): [0], ("sample", "num_inference_steps"): 4, ("sample", "prompts_per_concept"): 1,
         ("sample", "multi_prompts"): 1}
# Each experiment changes one eval param, so only evaluate and report re-run: the loop, not the training, is tested.
EXPERIMENTS = {"threshold": "eval.region_threshold=0.4", "padding": "eval.crop_padding=0.2"}


def _numbers(obj, prefix: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _numbers(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj} if isinstance(obj, int | float) and not isinstance(obj, bool) else {}


def test_baseline_experiment_queued_experiment_compare_and_params_stay_default(tmp_path: Path):
    project = make_project_copy(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    for (section, key), value in SMALL.items():
        assert key in params[section], f"params.yaml has no {section}.{key}: update SMALL"
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "small default for the test"], project)
    default = (project / "params.yaml").read_bytes()

    # 1. the default run, committed: the baseline (README: "make run", then commit dvc.lock and the metrics)
    run([sys.executable, "-m", "far.cli", "check-params", "params.yaml"], project)
    run(DVC + ["repro"], project)
    run(["git", "add", "dvc.lock", "reports/metrics.json", "dvclive/metrics.json"], project)
    run(["git", "commit", "-qm", "baseline: the default run"], project)
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], project).stdout == ""
    baseline = _numbers(json.loads((project / "reports/metrics.json").read_text()))
    assert baseline

    # 2. one experiment now (--temp: outside the workspace), one queued, then the queue run
    run(DVC + ["exp", "run", "--temp", "-n", "threshold", "-S", EXPERIMENTS["threshold"]], project)
    run(DVC + ["exp", "run", "--queue", "-n", "padding", "-S", EXPERIMENTS["padding"]], project)
    run(DVC + ["queue", "start"], project)
    for _ in range(600):  # the queue worker runs in the background: wait until it has finished (or failed)
        status = next((line for line in run(DVC + ["queue", "status"], project).stdout.splitlines()
                       if " padding " in f" {line} "), "")
        if status.endswith(("Success", "Failed")):
            break
        time.sleep(1)
    assert status.endswith("Success"), status + run(DVC + ["queue", "logs", "padding"], project, check=False).stdout
    assert (project / "params.yaml").read_bytes() == default  # the workspace is still the default

    # 3. compare: the baseline and both experiments, each with every metric
    shown = json.loads(run(DVC + ["exp", "show", "--json"], project).stdout)
    head = next(c for c in shown if c["rev"] != "workspace")
    exps = {e["name"]: e["revs"][0] for e in head.get("experiments") or []}
    assert set(EXPERIMENTS) <= set(exps), exps
    for rev, key, value in [(head, None, None), (exps["threshold"], "region_threshold", 0.4),
                            (exps["padding"], "crop_padding", 0.2)]:
        metrics = rev["data"]["metrics"]["reports/metrics.json"]["data"]
        assert set(_numbers(metrics)) == set(baseline), rev.get("name")
        if key:
            assert rev["data"]["params"]["params.yaml"]["data"]["eval"][key] == value
    for name in EXPERIMENTS:
        diff = json.loads(run(DVC + ["metrics", "diff", "HEAD", name, "--json", "--all"], project).stdout)
        rows = diff["reports/metrics.json"]
        assert set(rows) == set(baseline)
        assert all(r["old"] is not None and r["new"] is not None for r in rows.values()), rows
