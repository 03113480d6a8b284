"""DVC stage `report`: one static, offline HTML page of this run (and of every DVC experiment).

`far report --experiments` writes only `experiments.html` beside the page: the experiment table, fresh from
`dvc exp show --json` (experiments run after the stage are no dependency of it, so `dvc repro` skips it).
"""

from __future__ import annotations

from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, load_params
from stages import run_stage


def main(
    segmented: Path = typer.Option(Path("data/segmented"), help="Segment stage output."),
    fusion: Path = typer.Option(Path("data/fusion"), help="Fuse stage output."),
    samples: Path = typer.Option(Path("data/samples"), help="Sample stage output."),
    metrics: Path = typer.Option(Path("reports/metrics.json"), help="Evaluate stage metrics."),
    live: Path = typer.Option(Path("dvclive"), help="dvclive directory of the train stage."),
    out: Path = typer.Option(Path("reports/index.html"), help="The page to write."),
    assets: Path = typer.Option(Path("reports/assets"), help="Directory for the page's images."),
    eval_dir: Path = typer.Option(Path("reports/eval"), "--eval",
                                  help="Evaluate stage tables and backbones.json (the metric backbones' names)."),
    repo: Path = typer.Option(Path("."), help="DVC repository to list experiments from (`dvc exp show`)."),
    claims: Path = typer.Option(Path("reports/claims.md"), help="`far claims` output, shown when it exists "
                                "(written after the grid: no DVC dependency, like the experiment table)."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml to read the `report` section from."),
    experiments: bool = typer.Option(
        False, "--experiments", help="Only write experiments.html beside --out: every DVC experiment's metrics "
        "and changed params, fresh from `dvc exp show --json` (not a DVC output; run it after new experiments)."),
) -> None:
    """Build reports/index.html: metrics, samples with attention overlays, curves, fused data, references."""
    cfg = load_params(params).report
    from far.report import Inputs, build_report, write_experiments_page  # heavy: after params are validated

    if experiments:
        page = out.with_name("experiments.html")
        table, note = write_experiments_page(metrics, repo, page)
        print(f"report: {page} [{len(table['rows']) if table else 0} runs: {note}]")
        return
    ctx = build_report(Inputs(segmented, fusion, samples, metrics, live, eval_dir, claims), out, assets, cfg, repo=repo)
    exps = f"{len(ctx.experiments['rows'])} experiments" if ctx.experiments else "this run only"
    gaps = f"; missing: {', '.join(ctx.missing)}" if ctx.missing else ""
    print(f"report: {out} [{sum(len(p['seeds']) for p in ctx.samples)} samples, {len(ctx.curves)} curves, "
          f"{len(ctx.fusion)} training examples, {sum(len(r['photos']) for r in ctx.references)} references, "
          f"{exps}]{gaps}")


if __name__ == "__main__":
    run_stage(main)
