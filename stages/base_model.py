"""DVC stage `base_model`: build the embedded tiny model, or resolve and verify a real one, into `--out`."""

from __future__ import annotations

from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, load_params
from stages import run_stage


def main(
    out: Path = typer.Option(..., help="Output diffusers directory (models/base)."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml to read the `model` section from."),
) -> None:
    """Build (`model.pretrained: tiny`) or resolve + verify the base Stable Diffusion model."""
    cfg = load_params(params).model
    from far.models import prepare_base_model  # heavy (torch, diffusers): after params are validated

    record = prepare_base_model(cfg, out)
    sizes = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in record["parameters"].items())
    print(f"base_model: {record['pretrained']} ({record['source']}) -> {out} [{sizes}]")


if __name__ == "__main__":
    run_stage(main)
