"""DVC stage `priors`: class-prior images from the base model, segmented like the references, into `--out`."""

from __future__ import annotations

from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, load_params
from far.errors import InvalidInputError
from stages import run_stage


def main(
    base: Path = typer.Option(..., help="Base model directory (models/base)."),
    out: Path = typer.Option(..., help="Output directory (data/priors)."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml (concepts, priors, segment, model.resolution)."),
) -> None:
    """Generate `priors.per_class` images per class word with the base model and segment them."""
    cfg = load_params(params)
    if not (base / "model_index.json").is_file():
        raise InvalidInputError(f"{base}: no base model here (run the `base_model` stage)")
    from far.models import check_resolution, load_base_pipeline  # heavy (torch, diffusers): after the checks
    from far.priors import write_priors

    pipe = load_base_pipeline(base)
    check_resolution(pipe, cfg.model.resolution, base)
    rows = write_priors(pipe, out, cfg.concepts, cfg.priors, cfg.segment, cfg.model.resolution)
    flagged = sum(r["quality"] != "ok" for r in rows)
    words = sorted({r["class_word"] for r in rows})
    print(f"priors: {len(rows)} images of {words} -> {out} ({flagged} masks flagged, backend {rows[0]['backend']})")


if __name__ == "__main__":
    run_stage(main)
