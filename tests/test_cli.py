"""far/cli.py: the `far` console script lists and runs the stage commands."""

from __future__ import annotations

import shutil
from pathlib import Path

from far.cli import STAGES
from tests.conftest import ROOT, run


def _far() -> str:
    exe = shutil.which("far", path=str(Path(__import__("sys").executable).parent))
    assert exe, "the `far` console script is not installed in this environment"
    return exe


def test_help_lists_every_stage_command():
    out = run([_far(), "--help"], ROOT).stdout
    for stage in STAGES:
        assert stage.replace("_", "-") in out, stage


def test_check_params_reports_concepts_and_errors(params_file):
    ok = run([_far(), "check-params", str(ROOT / "params.yaml")], ROOT)
    assert "world_dog_a=<far-dog-a> dog" in ok.stdout
    bad = params_file(lambda d: d.__setitem__("trian", d.pop("train")))
    proc = run([_far(), "check-params", str(bad)], ROOT, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown key 'trian'" in proc.stderr


def test_stage_command_runs_the_stage(tmp_path: Path):
    out = tmp_path / "base"
    proc = run([_far(), "base-model", "--out", str(out), "--params", str(ROOT / "configs" / "dreambench-tiny.yaml")],
               ROOT)
    assert "base_model: tiny" in proc.stdout
    assert (out / "model_index.json").is_file()


def test_bad_flags_exit_2_with_the_usage_line_not_a_traceback():
    """Typer vendors its own click: its usage errors must still map to exit code 2 (far.errors.run_app)."""
    import sys

    for cmd in ([_far(), "report", "--bogus"], [sys.executable, "-m", "pipelines.flows", "nosuch"]):
        proc = run(cmd, ROOT, check=False)
        assert proc.returncode == 2, (cmd, proc.returncode, proc.stderr[-2000:])
        assert "Usage:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
