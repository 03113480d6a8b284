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


# `make test` runs on two pytest-xdist workers. A test file runs on one worker (its module fixtures are built
# once); the files whose tests share an expensive session fixture form one group, or each worker would build
# its own: the DVC reference run (~70 s) and the Prefect server (~20 s). Groups are handed out longest first, so
# that no worker is left with a long one at the end (measured here, one thread per worker: the reference run
# and its tests ~5 min, the flows ~2.5 min, segment ~2 min, train, sample and evaluate ~1 min each), then the rest
# in file order.
# (Not xdist's `xdist_group` marks: pytest 9.2 ignores the node-id suffix they rely on, pytest-xdist#1386.)
SESSION_FIXTURE_GROUPS = {
    "reference": ("tests/test_end_to_end.py", "tests/test_experiment_loop.py"),
    "prefect_server": ("tests/test_flows.py",),
}
FIRST_GROUPS = ("reference", "prefect_server", "tests/test_segment.py", "tests/test_train.py", "tests/test_sample.py",
                "tests/test_evaluate.py")
_GROUP_OF_FILE = {f: g for g, files in SESSION_FIXTURE_GROUPS.items() for f in files}


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def group_of(nodeid: str) -> str:
    return _GROUP_OF_FILE.get(file_of(nodeid), file_of(nodeid))


def pytest_xdist_make_scheduler(config, log):  # noqa: ANN001, ANN201 - xdist's hook
    """Schedule whole groups (group_of) on workers, in collection order (`--no-loadscope-reorder`)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that uses a shared session fixture outside its group's files (it would build the fixture
    again on another worker), and put the FIRST_GROUPS first."""
    for item in items:
        path = file_of(item.nodeid)
        for fixture, files in SESSION_FIXTURE_GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()) and path not in files:
                raise pytest.UsageError(f"{item.nodeid} uses the session fixture {fixture!r}: add {path} to "
                                        f"SESSION_FIXTURE_GROUPS[{fixture!r}] in tests/conftest.py")
    rank = {g: i for i, g in enumerate(FIRST_GROUPS)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(rank)))  # stable: file order otherwise


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
