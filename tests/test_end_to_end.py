"""The embedded default end to end under real DVC: cached re-runs, targeted ablations, reproducibility,
and recovery from SIGKILL in the middle of a stage (issue #7).

These run the whole pipeline several times, so the project copy uses a smaller (but complete) setting of
the same params (tests/pipeline_fixtures.py FAST). The uninterrupted reference run is the session fixture
`reference` (tests/conftest.py), shared with tests/test_experiment_loop.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import project_env, run
from tests.pipeline_fixtures import BASELINE_FILES, DVC, fast_project, results, sha256, stages_run

pytestmark = pytest.mark.slow


def test_repro_again_runs_nothing(reference):
    project, _ = reference
    out = run(DVC + ["repro"], project).stdout
    assert stages_run(out) == [], out
    assert "up to date" in run(DVC + ["status"], project).stdout.lower()


def test_refine_ablation_reruns_only_downstream_of_train_and_reverts(reference, tmp_path: Path):
    project = Path(shutil.copytree(reference[0], tmp_path / "ablation", symlinks=True))
    out = run(DVC + ["exp", "run", "-S", "train.refine.weight=0"], project).stdout
    assert stages_run(out) == ["train", "sample", "evaluate", "report"], out
    changed = yaml.safe_load((project / "params.yaml").read_text())["train"]["refine"]["weight"]
    assert changed == 0  # a workspace run leaves its params behind
    # the README's revert: back to the committed baseline, params and outputs
    run(["git", "checkout", "HEAD", "--", "params.yaml", *BASELINE_FILES], project)
    run(DVC + ["checkout"], project)
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], project).stdout == ""
    assert "up to date" in run(DVC + ["status"], project).stdout.lower()
    assert results(project) == reference[1]


def _kill_when(project: Path, stage: str, ready, timeout: float = 300) -> str:
    """Start `dvc repro <stage>`; SIGKILL its whole process group once `ready(output_so_far)` is true.

    Output is drained by a thread so that `ready` can also poll the file system (a stage's atomic temporary
    output appearing proves it was killed mid-write).
    """
    proc = subprocess.Popen(
        DVC + ["repro", stage], cwd=project, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    seen: list[str] = []
    drain = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    drain.start()
    deadline = time.monotonic() + timeout
    while not ready("".join(seen)):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"stage {stage!r} ended or timed out before the kill point:\n{''.join(seen)}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    drain.join(timeout=5)
    assert proc.returncode == -signal.SIGKILL
    return "".join(seen)


def test_a_second_clean_run_killed_in_fuse_and_in_train_ends_identical_to_the_reference(reference, tmp_path: Path):
    """A second clean run, SIGKILLed mid-write in `fuse` and after a checkpoint in `train`, each resumed with
    `dvc repro`, ends with the reference's byte-identical Parquet, weights and metrics: two clean runs are
    identical, and a kill changes nothing. (One project for both kills: the upstream stages run once.)"""
    _, expected = reference
    project = fast_project(tmp_path / "killed")
    _kill_when(project, "fuse", lambda _: any((project / "data").glob(".fusion.tmp-*")))
    assert not (project / "data/fusion").exists(), "a killed fuse must not leave an output DVC could cache"
    out = run(DVC + ["repro", "fuse"], project).stdout
    assert stages_run(out) == ["fuse"]
    assert not list((project / "data").glob(".fusion.tmp-*")), "the re-run must remove the killed run's temporary"
    assert sha256(project / "data/fusion/train.parquet") == expected["fusion"]

    output = _kill_when(project, "train", lambda out: "step 10/" in out)
    assert "Running stage 'train'" in output
    assert any((project / "models/checkpoints").glob("step-*")), "the killed run left no checkpoint"
    out = run(DVC + ["repro", "train"], project).stdout
    assert stages_run(out) == ["train"] and "resuming from" in out, out
    assert sha256(project / "models/far/delta.safetensors") == expected["delta"]

    out = run(DVC + ["repro"], project).stdout
    assert stages_run(out) == ["sample", "evaluate", "report"], out
    assert results(project) == expected
