"""DVC stage `train`: FaR fine-tuning with Localized Refinement; writes only the trained delta to `--out`."""

from __future__ import annotations

from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, load_params
from stages import run_stage


def main(
    base: Path = typer.Option(..., help="Base model directory (models/base)."),
    data: Path = typer.Option(..., help="Fusion training set (data/fusion/train.parquet)."),
    out: Path = typer.Option(..., help="Output delta directory (models/far)."),
    checkpoints: Path = typer.Option(..., help="Resumable checkpoints (models/checkpoints, persisted)."),
    live: Path = typer.Option(Path("dvclive"), help="dvclive log directory."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml: `train`, `concepts`, `model.resolution`."),
    stop_after: int = typer.Option(None, hidden=True, help="Stop after this many steps (tests resuming)."),
) -> None:
    """Fine-tune the base model on the fusion set; resume from the last checkpoint if one matches."""
    p = load_params(params)
    from far.train import train  # heavy (torch, diffusers, accelerate): after params are validated

    s = train(p.train, p.concepts, base, data, out, checkpoints, live, stop_after=stop_after,
              resolution=p.model.resolution)
    state = f"-> {out}" if s["done"] else f"stopped early (checkpoint in {checkpoints})"
    print(f"train: {s['steps']}/{p.train.steps} steps, {s['total']:,} trained parameters ({p.train.modules}) {state}")


if __name__ == "__main__":
    run_stage(main)
