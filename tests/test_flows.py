"""pipelines/: Prefect flows over real DVC in temporary git repositories, under one Prefect test server.

Most stages are not implemented yet, so the flow tests build a reduced pipeline in the project copy: an
upstream stage (the real `base_model` from dvc.yaml, or a cheaper toy `prepare` with the same output)
and a small `score` stage whose metric depends on `train.refine.weight` and on that output. The flows
are the production ones, unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from far.config import load_params
from far.errors import InvalidInputError
from pipelines.ablation import load_grid
from pipelines.dvc_cli import classify_failure, dvc, stage_graph, stream
from tests.conftest import ROOT, make_project_copy, run

pytestmark = pytest.mark.slow

SCORE = '''"""Toy metric stage for tests/test_flows.py: depends on models/base and train.refine.weight."""
import json
import pathlib

import yaml

weight = yaml.safe_load(open("params.yaml"))["train"]["refine"]["weight"]
size = sum(p.stat().st_size for p in sorted(pathlib.Path("models/base").rglob("*")) if p.is_file())
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("reports/metrics.json").write_text(json.dumps({"overall": {"score": size * 1e-6 * (1 + weight)}}))
pathlib.Path("reports/index.html").write_text("<html><body>toy report</body></html>")
'''


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect API server (SQLite in a temp dir) for every flow test; PREFECT_HOME is a temp dir."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # as pipelines/__init__.py sets it for the flows: no telemetry racing the fresh SQLite database
    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect_home"),
                             PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=90):
            yield



def test_flows_turn_off_prefect_server_telemetry_unless_the_user_set_it():
    """Its session write raced the first run's on a fresh SQLite PREFECT_HOME ("database is locked")."""
    code = ("import pipelines.flows; from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.analytics_enabled)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    off = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert off.stdout.strip() == "False", off.stderr[-2000:]
    mine = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "true"})
    assert mine.stdout.strip() == "True", mine.stderr[-2000:]

PREPARE = '''"""Toy upstream stage for tests/test_flows.py: a seeded blob standing in for the base model."""
import pathlib
import random

import yaml

seed = yaml.safe_load(open("params.yaml"))["model"]["seed"]
pathlib.Path("models/base").mkdir(parents=True, exist_ok=True)
pathlib.Path("models/base/weights.bin").write_bytes(random.Random(seed).randbytes(300_000))
'''


def _reduced_project(dest: Path, upstream: str = "toy", **orchestrate) -> Path:
    """A committed project copy whose dvc.yaml is an upstream stage -> score (toy metric, cached).

    upstream="base_model": the real stage from dvc.yaml (fault injection works there); "toy": `prepare`,
    a seconds-cheaper stand-in with the same output path (for the tests that are about DVC's caching).
    """
    root = make_project_copy(dest)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (root / "score.py").write_text(SCORE)
    (root / "prepare.py").write_text(PREPARE)
    first = {"base_model": stages["base_model"]} if upstream == "base_model" else {"prepare": {
        "cmd": "python prepare.py", "deps": ["prepare.py"], "params": ["model.seed"], "outs": ["models/base"]}}
    pipeline = {"stages": {
        **first,
        "score": {"cmd": "python score.py", "deps": ["score.py", "models/base"],
                  "params": ["train.refine.weight"], "metrics": ["reports/metrics.json"],
                  "outs": ["reports/index.html"]},
    }}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["orchestrate"] = {**params.get("orchestrate", {}), "retries": 2, "retry_delay": 0.0, "stages": {},
                             "gpu_stages": [], **orchestrate}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "reduced pipeline"], root)
    return root


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def _logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in arts}


# ------------------------------------------------------------------------------------- without Prefect
def test_stage_order_follows_the_dag_and_dvc_yaml(tmp_path: Path):
    graph = stage_graph(make_project_copy(tmp_path / "p"))
    declared = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert sorted(graph.order) == sorted(declared)
    for stage in graph.order:  # every upstream stage comes first
        assert all(graph.order.index(up) < graph.order.index(stage) for up in graph.upstream[stage]), stage
    needed = graph.select(["fuse"])
    assert needed[-1] == "fuse" and "segment" in needed and "train" not in needed and "report" not in needed
    with pytest.raises(InvalidInputError, match="no stage named 'trian'"):
        graph.select(["trian"])


def test_missing_dependency_is_not_retryable_and_names_it(tmp_path: Path):
    root = _reduced_project(tmp_path / "p")
    done = stream(dvc("repro", "--single-item", "score"), root, lambda *_: None)  # models/base not built
    failure = classify_failure("score", done)
    assert done.returncode != 0 and not failure.retryable
    assert "stage 'score'" in str(failure) and "models/base" in failure.cause


def test_ablation_grid_is_validated_before_anything_runs(tmp_path: Path):
    grid = load_grid(ROOT / "ablations.yaml", ROOT / "params.yaml")
    assert {"baseline", "+fusion", "+refine", "far", "dreambooth", "lora", "far-no-tokens"} <= {v.group for v in grid}
    assert {"far-s3", "far-s4", "far-s5"} <= {v.name for v in grid}  # one experiment per variant and seed
    baseline = next(v for v in grid if v.name == "baseline-s4")
    assert baseline.set_args() == ["-S", "fusion.num_single=0", "-S", "fusion.num_multi=0",
                                   "-S", "train.refine.weight=0.0", "-S", "train.seed=4"]
    bad = tmp_path / "grid.yaml"
    bad.write_text("variants:\n  typo:\n    train.refine.wieght: 0\n")
    with pytest.raises(InvalidInputError, match=r"variant 'typo'.*train\.refine\.wieght"):
        load_grid(bad, ROOT / "params.yaml")
    bad.write_text("variants:\n  negative:\n    train.refine.weight: -1\n")
    with pytest.raises(InvalidInputError, match=r"variant 'negative'.*train\.refine\.weight: -1 is invalid"):
        load_grid(bad, ROOT / "params.yaml")


def test_prefect_yaml_schedule_matches_params():
    cfg = load_params(ROOT / "params.yaml").orchestrate
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"far-pipeline", "far-ablation"}
    assert deployments["far-pipeline"]["schedules"] == [{"cron": cfg.cron, "timezone": cfg.timezone}]
    for d in deployments.values():
        path, name = d["entrypoint"].split(":")
        assert (ROOT / path).is_file() and f"def {name}(" in (ROOT / path).read_text()


def test_orchestrate_params_give_backoff_per_stage_and_name_bad_values(tmp_path: Path):
    from far.config import OrchestrateConfig, ParamsError
    from pipelines.flows import orchestrate_config

    cfg = OrchestrateConfig(retries=3, retry_delay=10, stages={"train": {"retries": 1}, "sample": {"retry_delay": 1}})
    assert cfg.retry_policy("segment") == (3, [10, 20, 40])
    assert cfg.retry_policy("train") == (1, [10])
    assert cfg.retry_policy("sample") == (3, [1, 2, 4])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["orchestrate"]["cron"] = "61 * * * *"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"orchestrate\.cron: not a cron expression"):
        orchestrate_config(tmp_path)


# ----------------------------------------------------------------------------------------- with Prefect
def test_transient_failure_is_retried_and_run_is_recorded(prefect_server, tmp_path: Path, monkeypatch):
    from pipelines.flows import far_pipeline

    root = _reduced_project(tmp_path / "p", upstream="base_model")
    marker = tmp_path / "failed-once"
    monkeypatch.setenv("FAR_FAIL_ONCE", f"base_model:{marker}")
    state = far_pipeline(project=str(root), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {"base_model": "ran", "score": "ran"}
    assert marker.exists(), "the injected failure never happened"

    flow_run_id = state.state_details.flow_run_id
    tasks = _task_runs(flow_run_id)
    assert tasks["base_model"].run_count == 2 and tasks["score"].run_count == 1
    logs = _logs(flow_run_id)
    assert any("injected transient failure" in m for m in logs)  # the stage's stderr, streamed
    assert any("Running stage 'base_model'" in m for m in logs)
    artifacts = _artifacts(flow_run_id)
    table = json.loads(artifacts["far-metrics"].data)
    assert table[0]["metric"] == "overall.score" and table[0]["value"] > 0
    assert artifacts["far-report"].data == f"[reports/index.html]({(root / 'reports/index.html').as_uri()})"


def test_invalid_params_stop_the_flow_before_dvc_deletes_any_output(prefect_server, tmp_path: Path):
    from far.config import ParamsError
    from far.errors import INVALID_INPUT
    from pipelines.flows import far_pipeline

    root = _reduced_project(tmp_path / "p")
    assert far_pipeline(project=str(root)) == {"prepare": "ran", "score": "ran"}
    before = (root / "models/base/weights.bin").read_bytes()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["resolution"] = -64  # invalid for every model (100 is refused by the config only for tiny)
    params["model"]["seed"] = 9  # `prepare` would re-run (and DVC delete models/base first) if the check let it
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    state = far_pipeline(project=str(root), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ParamsError) and error.exit_code == INVALID_INPUT
    assert "model.resolution: -64 is invalid" in str(error) and "\n" not in str(error)
    assert _task_runs(state.state_details.flow_run_id) == {}  # no stage started
    assert (root / "models/base/weights.bin").read_bytes() == before


def test_ablation_runs_variants_as_experiments_with_upstream_from_cache(prefect_server, tmp_path: Path):
    from pipelines.flows import ablation

    root = _reduced_project(tmp_path / "p")
    (root / "grid.yaml").write_text(yaml.safe_dump(
        {"variants": {"baseline": {"train.refine.weight": 0.0}, "+refine": {"train.refine.weight": 0.5}}}))

    state = ablation(project=str(root), grid="grid.yaml", jobs=2, return_state=True)
    rows = {r["variant"]: r for r in state.result()}
    assert set(rows) == {"baseline", "+refine"}
    scores = {name: r["metrics"]["overall.score"] for name, r in rows.items()}
    assert scores["+refine"] == pytest.approx(scores["baseline"] * 1.5)
    for r in rows.values():
        assert r["state"] == "success"
        assert r["ran"] == ["score"] and r["skipped"] == ["prepare"]  # the upstream stage came from the cache

    names = run(dvc("exp", "list", "--name-only"), root).stdout.split()
    assert sorted(names) == ["+refine", "baseline"]
    report = (root / "reports/ablations.md").read_text()
    assert "`baseline`" in report and "`+refine`" in report and "1: prepare" in report
    table = json.loads(_artifacts(state.state_details.flow_run_id)["far-ablations"].data)
    assert {(t["variant"], t["stages_run"], t["stages_from_cache"]) for t in table} == {
        ("baseline", 1, 1), ("+refine", 1, 1)}


def test_second_clone_pulls_everything_from_the_shared_remote(prefect_server, tmp_path: Path):
    from pipelines.flows import far_pipeline

    remote = tmp_path / "dvc-remote"
    first = _reduced_project(tmp_path / "first", remote=str(remote))
    assert far_pipeline(project=str(first)) == {"prepare": "ran", "score": "ran"}
    assert any(remote.rglob("*")), "nothing was pushed"

    second = tmp_path / "second"  # another worker: a clone of the same commit (no dvc.lock, no outputs)
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    assert not (second / "models").exists()
    assert far_pipeline(project=str(second)) == {"prepare": "skipped", "score": "skipped"}
    for path in ("models/base/weights.bin", "reports/metrics.json", "reports/index.html"):
        assert (second / path).read_bytes() == (first / path).read_bytes(), path


def test_gpu_tag_keeps_two_training_tasks_off_one_gpu(prefect_server, tmp_path: Path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from pipelines.flows import orchestrate_config, stage_task

    hold = ('import pathlib, time\nstart = time.time(); time.sleep(1.5)\n'
            'pathlib.Path("span.txt").write_text(f"{start} {time.time()}")\n')
    roots = []
    for name in ("a", "b"):
        root = make_project_copy(tmp_path / name)
        (root / "hold.py").write_text(hold)
        (root / "dvc.yaml").write_text(yaml.safe_dump(
            {"stages": {"train": {"cmd": "python hold.py", "deps": ["hold.py"], "outs": ["span.txt"]}}}))
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-q", "-m", "hold"], root)
        roots.append(root)
    cfg = orchestrate_config(roots[0])
    assert "gpu" in stage_task("train", cfg).tags and "gpu" not in stage_task("segment", cfg).tags

    @flow
    def two_trainings() -> None:
        futures = [stage_task("train", cfg).submit(str(r), "train") for r in roots]
        for f in futures:
            f.result()

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=cfg.gpu_tag, concurrency_limit=1)
        try:
            two_trainings()
        finally:
            client.delete_concurrency_limit_by_tag(tag=cfg.gpu_tag)
    (a0, a1), (b0, b1) = (map(float, (r / "span.txt").read_text().split()) for r in roots)
    assert a1 <= b0 or b1 <= a0, "two GPU-tagged stages ran at the same time"


def test_serve_schedules_the_pipeline_from_params(prefect_server, tmp_path: Path):
    from pipelines.serve import deployments

    root = _reduced_project(tmp_path / "p", cron="15 4 * * 1", timezone="Europe/Berlin")
    pipeline, grid = deployments(root)
    assert pipeline.name == "far-pipeline" and grid.name == "far-ablation"
    schedule = pipeline.schedules[0].schedule
    assert schedule.cron == "15 4 * * 1" and schedule.timezone == "Europe/Berlin"
    assert pipeline.parameters == {"project": str(root.resolve())} and not grid.schedules


def test_prefect_deploy_registers_both_deployments(prefect_server, tmp_path: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    root = make_project_copy(tmp_path / "p")
    shutil.copy2(ROOT / "prefect.yaml", root / "prefect.yaml")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="far-gpu", type="process"), overwrite=True)
    prefect = str(Path(sys.executable).parent / "prefect")
    proc = run([prefect, "--no-prompt", "deploy", "--all"], root, check=False, PREFECT_API_URL=PREFECT_API_URL.value(),
               PREFECT_HOME=str(tmp_path / "home"), FAR_PROJECT=str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with get_client(sync_client=True) as client:
        pipeline = client.read_deployment_by_name("far-pipeline/far-pipeline")
        grid = client.read_deployment_by_name("far-ablation/far-ablation")
    assert pipeline.work_pool_name == "far-gpu" and grid.work_pool_name == "far-gpu"
    assert pipeline.schedules[0].schedule.cron == load_params(ROOT / "params.yaml").orchestrate.cron
    # `prefect deploy` fills in $FAR_PROJECT: the checkout the worker runs the flows in
    assert pipeline.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]

