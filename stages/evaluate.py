"""DVC stage `evaluate`: CLIP-T / CLIP-I / DINO, multi-concept identity and attention diagnostics of the samples."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, dump_resolved, load_params
from stages import run_stage


def main(
    samples: Path = typer.Option(..., help="Sample stage output (data/samples) with manifest.parquet."),
    segmented: Path = typer.Option(..., help="Segment stage output (data/segmented): the reference images."),
    metrics: Path = typer.Option(..., help="Headline metrics JSON (reports/metrics.json, DVC metrics)."),
    out: Path = typer.Option(..., help="Directory of per-image / per-prompt tables (reports/eval)."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml to read `concepts` and `eval` from."),
) -> None:
    """Score every generated image against its prompt and its concepts' references; write metrics + tables."""
    cfg = load_params(params)
    from far.metrics import evaluate, write_outputs  # heavy (torch, transformers): after params are validated

    # Tiny backbones are rebuilt (deterministically, < 1 s) in a throw-away directory: nothing to cache.
    with tempfile.TemporaryDirectory(prefix="far-backbones-") as workdir:
        result, tables, run = evaluate(samples, segmented, cfg.concepts, cfg.eval, Path(workdir), segment=cfg.segment)
    write_outputs(result, tables, metrics, out, run | {"params": dump_resolved(cfg)["eval"]})
    head, names = result["overall"], run["backbones"]
    print(f"evaluate: {head['n_images']} images, CLIP-T {head['clip_t']:.4f}, CLIP-I {head['clip_i']:.4f}, "
          f"DINO {head['dino']:.4f} [{names['clip'].split(' (')[0]}, {names['dino'].split(' (')[0]}; "
          f"{run['images_per_second']:.1f} images/s] -> {metrics}, {out}")


if __name__ == "__main__":
    run_stage(main)
