"""Shared fixtures: the project root, a subprocess environment, and a throw-away DVC project copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# `make test` runs two pytest-xdist workers, one per core. Each worker, and every stage it starts, then runs torch
# on one thread: two processes of two OpenMP threads on two cores run several times slower (measured here).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests run on a worker per module (module fixtures are built once), except that every test of the shared
    DVC reference run, and every Prefect flow test, runs on one worker: the session fixture is built once."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        group = ("reference" if "reference" in names else "prefect" if "prefect_server" in names
                 else item.module.__name__)
        item.add_marker(pytest.mark.xdist_group(group))


# The tiny random-weight model on two DreamBench dogs (the default before the world): what the unit tests of
# config, training and CLI plumbing mutate; the world default itself is tested by the end-to-end tests.
TINY_PARAMS = ROOT / "configs" / "dreambench-tiny.yaml"
# What a fresh clone holds that stages need (everything else is a stage output or tooling).
PROJECT_FILES = ("far", "stages", "pipelines", "params.yaml", "dvc.yaml", "data/concepts", "pyproject.toml")


def project_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first on PATH (dvc's `python` is ours), offline."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = ""  # the copy's own far/ and stages/ must win over the checkout's
    env.update({"HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "CI": "true"})
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command (argument list, no shell) and return its completed process with text output."""
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(**env), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project_copy(dest: Path) -> Path:
    """A fresh git + DVC repository holding the project's tracked inputs, committed (dvc exp needs it)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    shutil.copy2(ROOT / ".gitignore", dest / ".gitignore")
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.email", "test@far.invalid"], dest)
    run(["git", "config", "user.name", "far tests"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.autostage", "true"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "project copy"], dest)
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A throw-away copy of the project as a committed git + DVC repository."""
    return make_project_copy(tmp_path / "project")


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The whole pipeline run once under DVC and committed as the baseline (tests/pipeline_fixtures.py), with
    the hashes of its outputs. Shared by every test that needs a finished run: copy it before changing it."""
    from tests.pipeline_fixtures import reference_run

    return reference_run(tmp_path_factory.mktemp("e2e") / "reference")


@pytest.fixture
def params_file(tmp_path: Path):
    """Write a params.yaml variant: `params_file(edit)` where `edit(dict)` mutates the tiny DreamBench params."""
    import yaml

    def write(edit=None) -> Path:
        data = yaml.safe_load(TINY_PARAMS.read_text())
        for c in data["concepts"]["subjects"]:
            c["images"] = str(ROOT / c["images"])
        if edit is not None:
            edit(data)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write
