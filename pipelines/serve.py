"""`python -m pipelines.serve`: serve the flows from this machine, the pipeline on `orchestrate.cron`.

A long-running process (no work pool needed): Prefect starts a scheduled `far-pipeline` run at every tick of
the cron (DVC skips what is unchanged, so a run with nothing new costs seconds), and the `far-ablation`
deployment runs on demand (`prefect deployment run far-ablation/far-ablation`). For GPU hosts behind a
work pool, use prefect.yaml (`prefect deploy --all`) instead.
"""

from __future__ import annotations

from pathlib import Path

import typer
from prefect import serve
from prefect.schedules import Cron

from far.errors import run_app
from pipelines.flows import ablation, far_pipeline, orchestrate_config


def deployments(project: Path) -> list:
    """The pipeline deployment (scheduled from params.yaml `orchestrate.cron`) and the ablation one."""
    root = project.resolve()
    cfg = orchestrate_config(root)
    pipeline = far_pipeline.to_deployment(
        name="far-pipeline", schedule=Cron(cfg.cron, timezone=cfg.timezone),
        parameters={"project": str(root)}, tags=["far"],
        description=f"dvc repro of {root}, stage by stage, on '{cfg.cron}' ({cfg.timezone})",
    )
    grid = ablation.to_deployment(name="far-ablation", parameters={"project": str(root)}, tags=["far"],
                                  description=f"the variants of {cfg.ablations} as DVC experiments")
    return [pipeline, grid]


def main(project: Path = typer.Option(Path("."), help="The DVC project the flows run in.")) -> None:
    """Serve far-pipeline (on its cron) and far-ablation until interrupted."""
    serve(*deployments(project))


if __name__ == "__main__":
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    run_app(app, prog="far-serve")
