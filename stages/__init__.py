"""Thin DVC stage entry points: parse params, call `far`, write outputs. One module per dvc.yaml stage."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from far.errors import FAILED, run_app


def run_stage(main: Callable[..., Any]) -> None:
    """Run a stage's typer `main` as a script (`python -m stages.<name>`); library bars are off under CI (run_app)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    stage = _stage_name(main)
    remove_stale_temporaries(stage)
    _fail_once(stage)
    run_app(app, prog=f"far {stage}")


def remove_stale_temporaries(stage: str, root: Path = Path(".")) -> list[Path]:
    """Delete what a killed run of `stage` left beside its dvc.yaml outputs (`.<name>.tmp-*`); returns them.

    Outputs are written to such temporaries and renamed into place (far.io), so a SIGKILL leaves one behind.
    DVC never removes them and may not even re-run the stage (its run cache restores the outputs), so every
    run of the stage sweeps them first, whether the output is a directory or a file (metrics, the page).
    """
    import yaml

    from far.io import remove_stale_tmp

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return []  # run by hand outside the project: the outputs are wherever --out says
    spec = (yaml.safe_load(dvc_yaml.read_text()).get("stages") or {}).get(stage) or {}
    entries = [e for kind in ("outs", "metrics", "plots") for e in spec.get(kind) or []]
    names = [name for entry in entries for name in (entry if isinstance(entry, dict) else [entry])]
    return [leftover for name in names for leftover in remove_stale_tmp(root / name)]


def _stage_name(main: Callable[..., Any]) -> str:
    """`base_model` for stages/base_model.py, also under `python -m` (where `__module__` is `__main__`)."""
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    return (spec.name if spec is not None else main.__module__).rsplit(".", 1)[-1]


def _fail_once(stage: str) -> None:
    """Fault injection for the orchestration tests (tests/test_flows.py), inert unless the variable is set.

    `FAR_FAIL_ONCE=<stage>:<marker file>`: the first run of `<stage>` creates the marker and exits with a
    transient failure (exit code 1, which orchestrators may retry); every later run proceeds normally.
    """
    name, _, marker = os.environ.get("FAR_FAIL_ONCE", "").partition(":")
    if name != stage or not marker or Path(marker).exists():
        return
    Path(marker).touch()
    print(f"far {stage}: error: injected transient failure (FAR_FAIL_ONCE)", file=sys.stderr)
    sys.exit(FAILED)
