"""The embedded default end to end under real DVC: cached re-runs, targeted ablations, reproducibility,
and recovery from SIGKILL in the middle of a stage (issue #7).

These run the whole pipeline several times, so the project copy uses a smaller (but complete) setting of
the same params: fewer steps, examples and samples. Every stage still runs its real code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project_copy, project_env, run

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
# dotted key -> value; a key that no longer exists fails loudly instead of silently testing defaults
FAST = {
    "priors.per_class": 2,
    "fusion.num_single": 6,
    "fusion.num_multi": 8,
    "train.steps": 12,
    "train.checkpoint_every": 4,
    "sample.seeds": [0],
}


def _set(params: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    if leaf not in node:
        raise KeyError(f"params.yaml has no key {dotted!r}: update tests/test_end_to_end.py FAST")
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One uninterrupted full run: the reference every other run must reproduce."""
    project = fast_project(tmp_path_factory.mktemp("e2e") / "reference")
    out = run(DVC + ["repro"], project).stdout
    assert stages_run(out) == ["base_model", "segment", "priors", "fuse", "train", "sample", "evaluate", "report"]
    return project, results(project)


def test_repro_again_runs_nothing(reference):
    project, _ = reference
    out = run(DVC + ["repro"], project).stdout
    assert stages_run(out) == [], out
    assert "up to date" in run(DVC + ["status"], project).stdout.lower()


def test_refine_ablation_reruns_only_downstream_of_train(reference):
    project, _ = reference
    out = run(DVC + ["exp", "run", "-S", "train.refine.weight=0"], project).stdout
    assert stages_run(out) == ["train", "sample", "evaluate", "report"], out


def test_two_clean_runs_are_identical(reference, tmp_path: Path):
    _, expected = reference
    project = fast_project(tmp_path / "again")
    run(DVC + ["repro"], project)
    assert results(project) == expected


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


def test_fuse_killed_mid_write_resumes_to_the_same_parquet(reference, tmp_path: Path):
    _, expected = reference
    project = fast_project(tmp_path / "killed-fuse")
    _kill_when(project, "fuse", lambda _: any((project / "data").glob(".fusion.tmp-*")))
    assert not (project / "data/fusion").exists(), "a killed fuse must not leave an output DVC could cache"
    out = run(DVC + ["repro", "fuse"], project).stdout
    assert stages_run(out) == ["fuse"]
    assert sha256(project / "data/fusion/train.parquet") == expected["fusion"]


def test_train_killed_after_a_checkpoint_resumes_to_the_same_weights(reference, tmp_path: Path):
    _, expected = reference
    project = fast_project(tmp_path / "killed-train")
    output = _kill_when(project, "train", lambda out: "step 10/" in out)
    assert "Running stage 'train'" in output
    assert any((project / "models/checkpoints").glob("step-*")), "the killed run left no checkpoint"
    out = run(DVC + ["repro", "train"], project).stdout
    assert stages_run(out) == ["train"] and "resuming from" in out, out
    assert sha256(project / "models/far/delta.safetensors") == expected["delta"]
