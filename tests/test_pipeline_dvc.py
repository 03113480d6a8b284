"""dvc.yaml: the stage graph runs under real DVC in a temporary git repository."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run

DVC = [sys.executable, "-m", "dvc"]
STAGES = ["base_model", "segment", "priors", "fuse", "train", "sample", "evaluate", "report"]


def test_dvc_yaml_declares_the_eight_stages_in_order():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert f"stages/{name}.py" in stage["deps"], name
        assert stage.get("params"), f"{name} lists no params"
        assert stage.get("outs") or stage.get("metrics"), f"{name} declares no outputs"


@pytest.mark.slow
def test_base_model_repro_is_cached_and_clean(project: Path):
    first = run(DVC + ["repro", "base_model"], project)
    assert "Running stage 'base_model'" in first.stdout
    assert (project / "models/base/model_index.json").is_file()
    assert (project / "dvc.lock").is_file()

    status = run(DVC + ["status", "base_model"], project)
    assert "up to date" in status.stdout.lower(), status.stdout

    again = run(DVC + ["repro", "base_model"], project)
    assert "Running stage" not in again.stdout
    assert "didn't change, skipping" in again.stdout

    ignored = run(["git", "check-ignore", "models/base"], project, check=False)
    assert ignored.returncode == 0, "stage outputs must be git-ignored"


def _set_param(project: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_only_the_params_a_stage_reads_make_it_stale(project: Path):
    run(DVC + ["repro", "base_model"], project)
    _set_param(project, "train", "steps", 7)
    assert "up to date" in run(DVC + ["status", "base_model"], project).stdout.lower()
    _set_param(project, "model", "seed", 5)
    status = run(DVC + ["status", "base_model"], project).stdout
    assert "changed deps" in status and "modified:" in status and "model" in status, status
