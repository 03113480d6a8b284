"""DVC stage `sample`: DreamBench + multi-concept prompts through the base model with the FaR delta applied."""

from __future__ import annotations

from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, load_params
from stages import run_stage


def main(
    base: Path = typer.Option(..., help="Base diffusers directory (models/base)."),
    delta: Path = typer.Option(..., help="Trained FaR delta directory (models/far), applied with far.load."),
    out: Path = typer.Option(..., help="Output directory (data/samples)."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml: `concepts`, `sample`, `model.resolution`."),
) -> None:
    """Generate evaluation images (fixed seeds) and each concept token's cross-attention maps."""
    cfg = load_params(params)
    from far.sample import run_sample  # heavy (torch, diffusers): after params are validated

    s = run_sample(base, delta, out, cfg.sample, cfg.concepts, resolution=cfg.model.resolution)
    rate = f"{s['images_per_second']:.2f} img/s" if s["images_per_second"] else "all resumed"
    print(f"sample: {s['images']} images ({s['prompts']} prompts x {len(cfg.sample.seeds)} seeds, "
          f"{s['resumed']} resumed) -> {out} [{s['device']}, {rate}]")


if __name__ == "__main__":
    run_stage(main)
