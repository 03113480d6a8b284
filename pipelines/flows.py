"""Prefect flows over the DVC pipeline: DVC decides what is stale and caches it; Prefect runs, retries,
schedules, fans out and records.

- `far_pipeline`: one task per dvc.yaml stage (`dvc repro --single-item <stage>`), in graph order, each
  stage's output streamed into the run log; transient failures retried with backoff, invalid input never.
- `ablation`: the variants of ablations.yaml as queued DVC experiments, their metrics side by side.

Run them directly (`python -m pipelines.flows pipeline`, `... ablation`), on a schedule
(`python -m pipelines.serve`) or through a work pool (prefect.yaml).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from far.config import OrchestrateConfig, ParamsError
from far.errors import FarError, InvalidInputError, run_app
from far.io import write_text
from pipelines import ablation as grid_lib
from pipelines.dvc_cli import (
    DvcError,
    StageFailed,
    StageGraph,
    classify_failure,
    dvc,
    run_detaching,
    run_quiet,
    stage_events,
    stage_graph,
    stage_params,
    stream,
    subprocess_env,
    threads_per_job,
)

PARAMS = "params.yaml"
REMOTE_NAME = "far-shared"  # the DVC remote `orchestrate.remote` is registered as (in .dvc/config.local)
ABLATIONS_REPORT = Path("reports/ablations.md")


class AblationFailed(FarError):
    """One or more experiments of the grid failed; reports/ablations.md still lists every variant."""


# --------------------------------------------------------------------------------------------- config
def orchestrate_config(root: Path) -> OrchestrateConfig:
    """The `orchestrate` section of `<root>/params.yaml`.

    Only this section is validated here: the stages validate the rest themselves, and concept folders
    are relative to the project root, which need not be the flow's working directory.
    """
    path = root / PARAMS
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        return OrchestrateConfig.model_validate(raw.get("orchestrate") or {})
    except ValidationError as exc:
        problems = [f"orchestrate.{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()]
        raise ParamsError(f"{path}: " + "; ".join(problems)) from None


def check_params(root: Path) -> None:
    """`far check-params` in the project (concept folders are relative to it), before DVC touches anything.

    DVC deletes a stage's outputs before running its command, so bad params found by the stage itself would
    cost the old outputs; here they raise ParamsError (exit code 2, never retried) with the one-line message.
    """
    proc = subprocess.run([sys.executable, "-m", "far.cli", "check-params", PARAMS], cwd=root,
                          env=subprocess_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise ParamsError(f"{root}: {lines[-1].removeprefix('far: error: ')}")


def _check_stage_names(cfg: OrchestrateConfig, graph: StageGraph) -> None:
    for key, names in (("stages", list(cfg.stages)), ("gpu_stages", cfg.gpu_stages)):
        for name in names:
            if name not in graph.upstream:
                raise ParamsError(f"{PARAMS}: orchestrate.{key}: no stage {name!r} in dvc.yaml "
                                  f"(stages: {', '.join(graph.order)})")


def configure_remote(root: Path, url: str | None) -> str | None:
    """Register `orchestrate.remote` as this clone's default DVC remote (local config, not committed).

    `dvc repro --pull` pulls from the default remote, so every worker clone uses the same one. A plain path
    is taken relative to the project root. Returns the remote's name, or None when no remote is set.
    """
    if not url:
        return None
    target = url if "://" in url else str((root / Path(url).expanduser()).resolve())
    run_quiet(["remote", "add", "--local", "--default", "--force", REMOTE_NAME, target], root,
              f"registering orchestrate.remote {url!r}")
    return REMOTE_NAME


# ---------------------------------------------------------------------------------------------- tasks
def _retry_condition(task_, task_run, state) -> bool:  # noqa: ANN001 - Prefect's RetryConditionCallable
    """Retry only what another attempt could fix: StageFailed says so; other exceptions are retried."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.retryable
    except InvalidInputError:
        return False
    except Exception:  # noqa: BLE001 - anything else (I/O, a killed process) may be transient
        return True
    return True


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_condition)
def dvc_stage(root: str, stage: str, remote: str | None = None) -> dict[str, Any]:
    """Reproduce one DVC stage (`dvc repro --single-item`), pulling from / pushing to the shared remote."""
    logger = get_run_logger()
    project = Path(root)

    def log(stream_name: str, line: str) -> None:
        logger.info("%s%s", "" if stream_name == "stdout" else "[stderr] ", line)

    started = time.monotonic()
    # --pull: DVC fetches the missing deps, the run-cache and the stage's cached outputs from the default
    # remote before deciding; so a stage another worker already ran is checked out, not re-run.
    args = ["repro", "--single-item", *(["--pull"] if remote else []), stage]
    done = stream(dvc(*args), project, log)
    if done.returncode != 0:
        raise classify_failure(stage, done)
    status = stage_events(done.stdout + done.stderr).get(stage, "unknown")
    if remote:
        pushed = stream(dvc("push", "--run-cache", "-r", remote, stage), project, log)
        if pushed.returncode != 0:
            cause = classify_failure(stage, pushed).cause
            raise StageFailed(stage, f"dvc push to {remote!r} failed: {cause}", None, retryable=True)
    seconds = round(time.monotonic() - started, 2)
    logger.info("stage %s: %s in %.1f s", stage, status, seconds)
    return {"stage": stage, "status": status, "seconds": seconds}


def stage_task(stage: str, cfg: OrchestrateConfig):  # noqa: ANN201 - a configured prefect Task
    """`dvc_stage` with this stage's retry policy and tags (`gpu_tag` for GPU stages)."""
    retries, delays = cfg.retry_policy(stage)
    tags = ["far", "dvc", f"stage:{stage}", *([cfg.gpu_tag] if stage in cfg.gpu_stages else [])]
    return dvc_stage.with_options(name=f"dvc-{stage}", task_run_name=stage, retries=retries,
                                  retry_delay_seconds=delays or 0, tags=tags)


def run_stages(root: Path, stages: list[str], cfg: OrchestrateConfig, remote: str | None) -> list[dict[str, Any]]:
    """Run `stages` one after another (one DVC writer per repository); the first failure stops the run."""
    return [stage_task(stage, cfg)(str(root), stage, remote) for stage in stages]


def _metrics_rows(root: Path) -> list[dict[str, Any]]:
    """Every metric of the workspace (`dvc metrics show --json`: the files dvc.yaml declares as metrics)."""
    shown = json.loads(run_quiet(["metrics", "show", "--json"], root, "`dvc metrics show`") or "{}")
    rows: list[dict[str, Any]] = []
    for content in shown.values():
        for file, data in (content.get("data") or {}).items():
            if "data" in data:
                rows += [{"file": file, "metric": k, "value": v}
                         for k, v in grid_lib.flatten(data["data"]).items()]
    return rows


def _report_pages(root: Path) -> list[Path]:
    """The HTML outputs dvc.yaml declares (reports/index.html), where they exist."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    pages = []
    for spec in stages.values():
        for out in spec.get("outs", []) or []:
            path = next(iter(out)) if isinstance(out, dict) else out
            if str(path).endswith(".html") and (root / path).is_file():
                pages.append(root / path)
    return pages


def publish_artifacts(root: Path, results: list[dict[str, Any]]) -> None:
    """Run summary, metrics table and a link to the HTML report, as Prefect artifacts (when they exist)."""
    logger = get_run_logger()
    summary = ["| stage | status | seconds |", "|---|---|---|"]
    summary += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in results]
    ran = sum(r["status"] == "ran" for r in results)
    create_markdown_artifact(key="far-pipeline-stages", markdown="\n".join(summary),
                             description=f"{ran} stage(s) ran, {len(results) - ran} skipped (DVC cache) in {root}")
    rows = _metrics_rows(root)
    if rows:
        create_table_artifact(key="far-metrics", table=rows, description=f"dvc metrics show, {root}")
    else:
        logger.info("no metrics in %s yet: no metrics table", root)
    for page in _report_pages(root):
        create_link_artifact(key="far-report", link=page.as_uri(), link_text=str(page.relative_to(root)),
                             description="the pipeline's HTML report")


# ---------------------------------------------------------------------------------------------- flows
@flow(name="far-pipeline")
def far_pipeline(project: str = ".", targets: list[str] | None = None) -> dict[str, str]:
    """Every DVC stage (or `targets` and their upstream stages) as one retried task each, in graph order.

    Returns {stage: "ran" | "skipped"}; skipped = DVC found it up to date or restored it from a cache.
    """
    root = Path(project).resolve()
    cfg = orchestrate_config(root)
    check_params(root)
    graph = stage_graph(root)
    _check_stage_names(cfg, graph)
    remote = configure_remote(root, cfg.remote)
    results = run_stages(root, graph.select(targets), cfg, remote)
    publish_artifacts(root, results)
    return {r["stage"]: r["status"] for r in results}


def parse_queue_status(text: str) -> tuple[dict[str, tuple[str, str]], int | None]:
    """`dvc queue status` output -> ({task id: (experiment name, Queued | Running | Success | Failed)}, the
    number of workers, active and idle, from its "Worker status: N active, M idle" line; None without it)."""
    rows: dict[str, tuple[str, str]] = {}
    workers = None
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("Worker status"):
            counts = re.findall(r"(\d+) (?:active|idle)", line)
            workers = sum(map(int, counts)) if counts else None
        elif len(parts) >= 3 and parts[0] != "Task":
            rows[parts[0]] = (parts[1], parts[-1])
    return rows, workers


def read_queue(root: Path) -> tuple[dict[str, tuple[str, str]], int | None]:
    """`dvc queue status` of the project at `root`, parsed (parse_queue_status)."""
    return parse_queue_status(run_quiet(["queue", "status"], root, "`dvc queue status`"))


def queue_status(root: Path) -> dict[str, tuple[str, str]]:
    """{task id: (experiment name, Queued | Running | Success | Failed)} from `dvc queue status`."""
    return read_queue(root)[0]


STALL_SECONDS = 30.0


def stalled(states: dict[str, str], workers: int | None) -> bool:
    """Experiments wait in the queue with no worker left to run them: DVC's workers can exit with tasks still
    queued (treeverse/dvc#10562; seen here as "Got shutdown from remote" after one experiment each)."""
    values = set(states.values())
    return workers == 0 and "Queued" in values and "Running" not in values


@task(cache_policy=NO_CACHE, persist_result=False)
def queue_variants(root: str, variants: list[dict[str, Any]]) -> dict[str, str]:
    """`dvc exp run --queue -n <name> -S ...` per variant (same-named old experiments removed first).

    Not `--force`: for `dvc exp run` it means "re-run every stage", which would defeat the cache.
    """
    logger, project = get_run_logger(), Path(root)
    names = [v["name"] for v in variants]
    existing = set(run_quiet(["exp", "list", "--name-only"], project, "`dvc exp list`").split())
    if stale := [n for n in names if n in existing]:
        run_quiet(["exp", "remove", *stale], project, "`dvc exp remove`")
        logger.info("removed earlier experiments %s", stale)
    before = set(queue_status(project))
    for v in variants:
        variant = grid_lib.Variant(v["name"], v["overrides"])
        run_quiet(["exp", "run", "--queue", "-n", variant.name, *variant.set_args()], project,
                  f"queueing variant {variant.name!r}")
        logger.info("queued %s: %s", variant.name, variant.describe())
    ids = {name: tid for tid, (name, _) in queue_status(project).items() if tid not in before and name in names}
    if missing := [n for n in names if n not in ids]:
        raise DvcError(f"`dvc queue status` does not list the queued variants {missing}")
    return ids


@task(cache_policy=NO_CACHE, persist_result=False)
def run_queue(root: str, ids: dict[str, str], jobs: int, timeout: float, poll: float = 2.0) -> dict[str, Any]:
    """`dvc queue start -j <jobs>`, wait for every queued variant, return {name: status, ran, skipped}."""
    logger, project = get_run_logger(), Path(root)

    def start_workers() -> float:
        run_detaching(["queue", "start", "-j", str(jobs)], project, "`dvc queue start`", **threads_per_job(jobs))
        return time.monotonic()

    started = start_workers()
    deadline, last, stalled_since = started + timeout, {}, None
    while True:
        status, workers = read_queue(project)
        states = {name: status.get(tid, (name, "Unknown"))[1] for name, tid in ids.items()}
        if states != last:
            logger.info("queue: %s", ", ".join(f"{n} {s}" for n, s in states.items()))
            last = states
        if all(s in ("Success", "Failed") for s in states.values()):
            break
        # Stalled for STALL_SECONDS, and as long since the last start: a worker between two tasks, or one still
        # starting, is not a dead one. `dvc queue start` skips the named workers it sees running.
        now = time.monotonic()
        stalled_since = (stalled_since or now) if stalled(states, workers) else None
        if stalled_since is not None and now - stalled_since >= STALL_SECONDS and now - started >= STALL_SECONDS:
            logger.warning("queue: experiments queued, no worker left (treeverse/dvc#10562): `dvc queue start` again")
            started, stalled_since = start_workers(), None
        if time.monotonic() > deadline:
            raise DvcError(f"ablation queue not finished after {timeout:.0f} s (orchestrate.queue_timeout): {states}")
        time.sleep(poll)
    results: dict[str, Any] = {}
    for name, tid in ids.items():
        proc = subprocess.run(dvc("queue", "logs", tid), cwd=project, env=subprocess_env(),
                              capture_output=True, text=True)
        lines = proc.stdout.splitlines()
        events = stage_events(lines)
        for line in lines:
            logger.info("[%s] %s", name, line)
        errors = [line for line in lines if line.startswith("ERROR") or ": error: " in line]
        results[name] = {"status": states[name].lower(), "error": errors[0] if errors else None,
                         "ran": [s for s, e in events.items() if e == "ran"],
                         "skipped": [s for s, e in events.items() if e == "skipped"]}
    return results


@flow(name="far-ablation")
def ablation(project: str = ".", variants: list[str] | None = None, grid: str | None = None,
             jobs: int | None = None, keep: bool = False) -> list[dict[str, Any]]:
    """Queue the grid's experiments (variant x seed) as DVC experiments, run them, and tabulate their metrics.

    The stages no variant touches run first, once, in the workspace: every experiment then takes them from
    the cache, and reports/ablations.md shows it (stages run vs. from the cache, per experiment).
    `variants` names variants (every seed) or experiments (`far-s4`). `keep`: experiments of this commit
    that finished with the same params are kept (state `kept`), not queued again.
    """
    logger = get_run_logger()
    root = Path(project).resolve()
    cfg = orchestrate_config(root)
    check_params(root)
    grid_path = root / (grid or cfg.ablations)
    chosen = grid_lib.load_grid(grid_path, root / PARAMS)
    if variants is not None:
        unknown = sorted(set(variants) - {v.name for v in chosen} - {v.group for v in chosen})
        if unknown:
            raise InvalidInputError(f"{grid_path}: no variant {unknown}; variants: "
                                    f"{list(dict.fromkeys(v.group for v in chosen))}")
        chosen = [v for v in chosen if v.name in variants or v.group in variants]
    graph = stage_graph(root)
    _check_stage_names(cfg, graph)
    touched = grid_lib.touched_stages(graph, stage_params(root), chosen)
    shared = [s for s in graph.order if s not in touched]
    logger.info("stages shared by every variant (run once, then cached): %s", shared or "none")
    remote = configure_remote(root, cfg.remote)
    run_stages(root, shared, cfg, remote)

    tags = ["far", "dvc-queue", *([cfg.gpu_tag] if touched & set(cfg.gpu_stages) else [])]
    kept: set[str] = set()
    if keep:
        before = json.loads(run_quiet(["exp", "show", "--json"], root, "`dvc exp show`"))
        kept = grid_lib.finished(before, chosen, yaml.safe_load((root / PARAMS).read_text()))
        logger.info("kept (finished with the same params): %s", sorted(kept) or "none")
    todo = [{"name": v.name, "overrides": v.overrides} for v in chosen if v.name not in kept]
    logger.info("experiments to run: %d of %d", len(todo), len(chosen))
    outcome = {n: {"status": "kept", "error": None, "ran": [], "skipped": []} for n in kept}
    if todo:
        ids = queue_variants(str(root), todo)
        outcome |= run_queue.with_options(tags=tags)(str(root), ids, jobs or cfg.queue_jobs, cfg.queue_timeout)
    shown = json.loads(run_quiet(["exp", "show", "--json"], root, "`dvc exp show`"))
    metrics = grid_lib.experiment_metrics(shown, {v.name for v in chosen})

    rows = grid_lib.result_rows(chosen, outcome, metrics)
    keys = sorted({k for r in rows for k in r["metrics"]})
    write_text(root / ABLATIONS_REPORT, grid_lib.markdown(rows, keys))
    create_table_artifact(key="far-ablations", table=grid_lib.table(rows),
                          description=f"ablation grid {grid_path.name} in {root}")
    logger.info("wrote %s", root / ABLATIONS_REPORT)
    if failed := [r for r in rows if r["state"] not in ("success", "kept")]:
        raise AblationFailed("; ".join(f"variant {r['variant']!r} {r['state']}: {r['error']}" for r in failed)
                             + f" (see {ABLATIONS_REPORT})")
    return rows


# ------------------------------------------------------------------------------------------------ CLI
cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n\n")[0])


@cli.command("pipeline")
def pipeline_cmd(
    project: Path = typer.Option(Path("."), help="The DVC project (a git repository)."),
    stage: list[str] = typer.Option(None, help="Run only this stage and its upstream stages (repeatable)."),
) -> None:
    """Run the pipeline flow once."""
    result = far_pipeline(project=str(project), targets=stage or None)
    print("far-pipeline: " + ", ".join(f"{s} {r}" for s, r in result.items()))


@cli.command("ablation")
def ablation_cmd(
    project: Path = typer.Option(Path("."), help="The DVC project (a git repository, committed)."),
    variant: list[str] = typer.Option(None, help="Only these variants of the grid (repeatable)."),
    grid: str = typer.Option(None, help="Variant grid, relative to the project (default orchestrate.ablations)."),
    jobs: int = typer.Option(None, help="Experiments at once (default orchestrate.queue_jobs)."),
    keep: bool = typer.Option(False, help="Keep experiments of this commit that finished with the same params."),
) -> None:
    """Run the ablation flow once."""
    rows = ablation(project=str(project), variants=variant or None, grid=grid, jobs=jobs, keep=keep)
    print(f"far-ablation: {len(rows)} experiments -> {project / ABLATIONS_REPORT}")


if __name__ == "__main__":
    run_app(cli, prog="far-flows")
