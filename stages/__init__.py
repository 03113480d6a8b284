"""Thin DVC stage entry points: parse params, call `far`, write outputs. One module per dvc.yaml stage."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer

from far.errors import run_app


def run_stage(main: Callable[..., Any]) -> None:
    """Run a stage's typer `main` as a script (`python -m stages.<name>`)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    # A declared-but-unimplemented stage takes no options: accept dvc.yaml's arguments so that it
    # reaches its own "not implemented yet" error instead of a usage error.
    lenient = {"ignore_unknown_options": True, "allow_extra_args": True}
    app.command(context_settings=lenient if not inspect.signature(main).parameters else None)(main)
    run_app(app, prog=f"far {main.__module__.rsplit('.', 1)[-1]}")
