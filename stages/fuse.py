"""DVC stage `fuse`: Concept Fusion, the training set `--out/train.parquet` (+ preview.png, summary.json)."""

from __future__ import annotations

from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, load_params
from stages import run_stage


def main(
    segmented: Path = typer.Option(Path("data/segmented"), help="Segment stage output (manifest.parquet)."),
    priors: Path = typer.Option(Path("data/priors"), help="Priors stage output (manifest.parquet)."),
    out: Path = typer.Option(Path("data/fusion"), help="Output directory (train.parquet, preview.png, summary.json)."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml to read `concepts`, `fusion`, `model` from."),
    preview: int = typer.Option(
        None, min=1, help="Only write a grid of N examples of the existing OUT/train.parquet with mask outlines "
        "to --preview-file (nothing is rebuilt)."),
    preview_file: Path = typer.Option(Path("reports/fusion_preview.png"), help="Where --preview N writes its grid."),
) -> None:
    """Compose the training set: references, re-composed singles, multi-concept composites and priors."""
    cfg = load_params(params)
    from far.fusion import fuse, write_preview

    if preview is not None:
        shown = write_preview(out / "train.parquet", preview, preview_file, [c.name for c in cfg.concepts.subjects])
        print(f"fuse: preview of {shown} examples of {out / 'train.parquet'} -> {preview_file}")
        return
    summary = fuse(segmented, priors, out, cfg.concepts, cfg.fusion, cfg.model.resolution)
    kinds = ", ".join(f"{v} {k}" for k, v in summary["kinds"].items())
    print(f"fuse: {summary['rows']} examples ({kinds}) at {summary['resolution']} px -> {out / 'train.parquet'}")


if __name__ == "__main__":
    run_stage(main)
