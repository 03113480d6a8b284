"""DVC stage `report`: one static, offline HTML page of this run (and of every DVC experiment)."""

from __future__ import annotations

from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, load_params
from stages import run_stage


def main(
    segmented: Path = typer.Option(..., help="Segment stage output (data/segmented)."),
    fusion: Path = typer.Option(..., help="Fuse stage output (data/fusion)."),
    samples: Path = typer.Option(..., help="Sample stage output (data/samples)."),
    metrics: Path = typer.Option(..., help="Evaluate stage metrics (reports/metrics.json)."),
    live: Path = typer.Option(..., help="dvclive directory of the train stage (dvclive)."),
    out: Path = typer.Option(..., help="The page to write (reports/index.html)."),
    assets: Path = typer.Option(..., help="Directory for the page's images (reports/assets)."),
    eval_dir: Path = typer.Option(None, "--eval", help="Per-prompt tables of the evaluate stage (reports/eval)."),
    repo: Path = typer.Option(Path("."), help="DVC repository to list experiments from (`dvc exp show`)."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml to read the `report` section from."),
) -> None:
    """Build reports/index.html: metrics, samples with attention overlays, curves, fused data, references."""
    cfg = load_params(params).report
    from far.report import Inputs, build_report  # heavy (matplotlib, pandas): after params are validated

    ctx = build_report(Inputs(segmented, fusion, samples, metrics, live, eval_dir), out, assets, cfg, repo=repo)
    exps = f"{len(ctx.experiments['rows'])} experiments" if ctx.experiments else "this run only"
    gaps = f"; missing: {', '.join(ctx.missing)}" if ctx.missing else ""
    print(f"report: {out} [{sum(len(p['seeds']) for p in ctx.samples)} samples, {len(ctx.curves)} curves, "
          f"{len(ctx.fusion)} training examples, {sum(len(r['photos']) for r in ctx.references)} references, "
          f"{exps}]{gaps}")


if __name__ == "__main__":
    run_stage(main)
