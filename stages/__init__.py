"""Thin DVC stage entry points: parse params, call `far`, write outputs. One module per dvc.yaml stage."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from far.errors import FAILED, run_app
from far.progress import silence_library_bars


def run_stage(main: Callable[..., Any]) -> None:
    """Run a stage's typer `main` as a script (`python -m stages.<name>`)."""
    silence_library_bars()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    stage = _stage_name(main)
    _fail_once(stage)
    run_app(app, prog=f"far {stage}")


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
