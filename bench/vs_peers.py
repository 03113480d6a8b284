"""far's `train` stage side by side with the peers' published training scripts; writes reports/bench/vs_peers.json.

Every run is a fresh process on the same base model, images, resolution, batch, trainable modules and step
count, one thread each (OMP/MKL_NUM_THREADS=1), fp32, no prior preservation:

    cd_shipped    diffusers' train_custom_diffusion.py as shipped (2 loader workers, restarted every epoch)
    cd_workers0   the same with --dataloader_num_workers 0
    far_kv        far `train`, modules crossattn_kv + token rows, refine on (train.refine.weight 0.1)
    far_kv_off    the same with refine off (train.refine.weight 0): the refine overhead is far_kv / far_kv_off
    dreambooth    diffusers' train_dreambooth.py: the whole UNet (text encoder frozen)
    far_unet      far `train`, modules unet, no token rows, refine on

Each variant runs at two step counts (`--steps 4 --steps 44`); the time per step is the difference divided by
the difference of the counts, so imports, model loading, data set-up and saving (start-up) drop out, and are
reported on their own. Runs are interleaved (each repetition runs every variant once at each count, in an
order rotated per repetition) so load from other processes hits all alike; figures are medians over the
repetitions. Both wall time and CPU time (user + sys of the run and its reaped children, e.g. loader
workers) are recorded: on a shared machine CPU time is the steadier one.

The peers' scripts are not part of this project: pass their paths (diffusers' examples/custom_diffusion and
examples/dreambooth, unmodified). A peer whose path is not given is skipped.

    python bench/vs_peers.py --custom-diffusion ../shared/peers/train_custom_diffusion.py \\
        --dreambooth ../shared/peers/train_dreambooth.py           # tiny base model built here
    python bench/vs_peers.py --base /path/to/sd-2-1-base --resolution 512 ...   # any diffusers SD directory
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_CONCEPTS = [("dog", "<far-dog>", "data/concepts/dog"), ("dog3", "<far-dog3>", "data/concepts/dog3")]
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                 "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}


@dataclass
class Variant:
    name: str
    tool: str  # far | custom_diffusion | dreambooth
    modules: str  # what trains, in far's words
    far_train: dict | None = None  # far: overrides of the `train` section
    peer_args: tuple[str, ...] = ()  # peers: extra arguments beyond the shared ones


VARIANTS = [
    Variant("cd_shipped", "custom_diffusion", "crossattn_kv + token rows",
            peer_args=("--freeze_model", "crossattn_kv")),
    Variant("cd_workers0", "custom_diffusion", "crossattn_kv + token rows",
            peer_args=("--freeze_model", "crossattn_kv", "--dataloader_num_workers", "0")),
    Variant("far_kv", "far", "crossattn_kv + token rows", far_train={"modules": "crossattn_kv"}),
    Variant("far_kv_off", "far", "crossattn_kv + token rows",
            far_train={"modules": "crossattn_kv", "refine": {"weight": 0.0, "exclusivity_weight": 0.0}}),
    Variant("dreambooth", "dreambooth", "unet"),
    Variant("far_unet", "far", "unet", far_train={"modules": "unet", "train_token_embeddings": False}),
]
RATIOS = {  # name: (numerator variant, denominator variant); per-step time ratios, > 1: the numerator is slower
    "far_kv_vs_cd_workers0": ("far_kv", "cd_workers0"),
    "far_kv_vs_cd_shipped": ("far_kv", "cd_shipped"),
    "far_unet_vs_dreambooth": ("far_unet", "dreambooth"),
    "refine_overhead": ("far_kv", "far_kv_off"),
}


def prompt() -> str:
    return "a photo of " + " and ".join(f"{tok} dog" for _, tok, _ in PROMPT_CONCEPTS)


def concepts_section() -> dict:
    return {"subjects": [{"name": n, "token": t, "class_word": "dog", "images": str(ROOT / d)}
                         for n, t, d in PROMPT_CONCEPTS]}


def prepare_data(work: Path, data: Path | None, count: int, resolution: int) -> tuple[Path, Path]:
    """The far training set (parquet) and the same instance images as files for the peers (instance/)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from far.config import ConceptsConfig
    from far.dataset import write_training_set
    from far.trainset import simple_composites

    parquet = work / "train.parquet"
    if data is None:
        subjects = ConceptsConfig.model_validate(concepts_section()).subjects
        write_training_set(simple_composites(subjects, resolution, count, seed=0), parquet, row_group_size=8)
    else:
        shutil.copyfile(data, parquet)
    instance = work / "instance"
    shutil.rmtree(instance, ignore_errors=True)
    instance.mkdir(parents=True)
    table = pq.read_table(parquet, columns=["id", "kind", "image"]).to_pylist()
    for row in table:
        if row["kind"] != "prior":  # far trains on these rows with train.prior_ratio 0: the peers get the same
            Image.open(io.BytesIO(row["image"])).convert("RGB").save(instance / f"{row['id']}.png")
    return parquet, instance


def write_params(path: Path, resolution: int, train: dict) -> None:
    base_train = {"prior_ratio": 0.0, "checkpoint_every": 10**6, "log_every": 10**6, "mixed_precision": "no"}
    merged = {**base_train, **{k: v for k, v in train.items() if k != "refine"}}
    if "refine" in train:
        merged["refine"] = train["refine"]
    params = {"model": {"pretrained": "tiny", "resolution": resolution}, "concepts": concepts_section(),
              "train": merged}
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def command(v: Variant, steps: int, ctx: dict, out: Path) -> list[str]:
    """The command line of one run of `v` for `steps` optimizer steps, writing under `out`."""
    py = sys.executable
    if v.tool == "far":
        return [py, "-m", "stages.train", "--base", str(ctx["base"]), "--data", str(ctx["parquet"]),
                "--out", str(out / "delta"), "--checkpoints", str(out / "checkpoints"), "--live", str(out / "live"),
                "--params", str(ctx["params"][v.name])]
    shared = ["--pretrained_model_name_or_path", str(ctx["base"]), "--instance_data_dir", str(ctx["instance"]),
              "--instance_prompt", prompt(), "--output_dir", str(out), "--resolution", str(ctx["resolution"]),
              "--train_batch_size", str(ctx["batch_size"]), "--max_train_steps", str(steps),
              "--checkpointing_steps", str(10**6), "--seed", "3"]
    if v.tool == "custom_diffusion":  # the two identifiers as CD's modifier tokens (their embedding rows train)
        shared += ["--modifier_token", "+".join(t for _, t, _ in PROMPT_CONCEPTS),
                   "--initializer_token", "+".join("dog" for _ in PROMPT_CONCEPTS)]
    return [py, str(ctx["scripts"][v.tool]), *shared, *v.peer_args]


def run_once(cmd: list[str], out: Path, log: Path) -> tuple[float, float]:
    """(wall s, CPU s of the process and its reaped children); raises with the log's tail on failure."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, **SINGLE_THREAD, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("w") as f:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"exit {res.returncode}: {' '.join(cmd)}\n--- {log} (tail)\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(out, ignore_errors=True)  # deltas / pipelines are not kept (a full UNet is large)
    return wall, cpu


def machine_state() -> dict:
    busy = subprocess.run(["pgrep", "-af", "far world pretrain"], capture_output=True, text=True).stdout.strip()
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(), "world_pretrain_running": bool(busy)}


def summarise(runs: dict[str, list[dict]], n1: int, n2: int) -> dict[str, dict]:
    """Per variant: median per-step and start-up times (wall and CPU) over the repetitions."""
    out = {}
    for name, reps in runs.items():
        row = {}
        for kind in ("wall", "cpu"):
            per_step = [(r[n2][kind] - r[n1][kind]) / (n2 - n1) for r in reps if n1 in r and n2 in r]
            startup = [r[n1][kind] - n1 * s for r, s in zip(reps, per_step, strict=False)]
            if per_step:
                row[f"{kind}_s_per_step"] = round(statistics.median(per_step), 4)
                row[f"{kind}_startup_s"] = round(statistics.median(startup), 2)
                row[f"{kind}_steps_per_s"] = round(1 / statistics.median(per_step), 3)
                row[f"{kind}_s_per_step_all"] = [round(s, 4) for s in per_step]
        out[name] = row
    return out


def ratios(summary: dict[str, dict]) -> dict[str, dict]:
    res = {}
    for key, (a, b) in RATIOS.items():
        if a in summary and b in summary and summary[a] and summary[b]:
            res[key] = {k: round(summary[a][f"{k}_s_per_step"] / summary[b][f"{k}_s_per_step"], 3)
                        for k in ("wall", "cpu")}
    return res


def table(report: dict) -> str:
    """The README's table (markdown): per-step times, start-up, and steps/s against the peer of the same modules."""
    peer_of = {"far_kv": "cd_workers0", "far_kv_off": "cd_workers0", "cd_shipped": "cd_workers0",
               "far_unet": "dreambooth"}
    lines = ["| run | trains | CPU s/step | wall s/step | start-up (CPU s) | steps/s (CPU) vs |",
             "| --- | --- | --- | --- | --- | --- |"]
    summary = report["variants"]
    for v in VARIANTS:
        s = summary.get(v.name)
        if not s:
            continue
        peer = summary.get(peer_of.get(v.name, ""))
        rel = f"{peer['cpu_s_per_step'] / s['cpu_s_per_step']:.2f}x `{peer_of[v.name]}`" if peer else "-"
        lines.append(f"| `{v.name}` | {v.modules} | {s['cpu_s_per_step']:.3f} | {s['wall_s_per_step']:.3f} | "
                     f"{s['cpu_startup_s']:.1f} | {rel} |")
    return "\n".join(lines)


def main(
    custom_diffusion: Path = typer.Option(None, exists=True, dir_okay=False,
                                          help="diffusers' examples/custom_diffusion/train_custom_diffusion.py"),
    dreambooth: Path = typer.Option(None, exists=True, dir_okay=False,
                                    help="diffusers' examples/dreambooth/train_dreambooth.py"),
    base: Path = typer.Option(None, help="Base diffusers directory; default: the tiny model built by "
                                         "stages.base_model."),
    data: Path = typer.Option(None, help="A fusion parquet to train on (its non-prior rows); default: "
                                         "far.trainset.simple_composites of the two shipped dogs."),
    images: int = typer.Option(6, help="Composites made when --data is not given."),
    resolution: int = typer.Option(256),
    batch_size: int = typer.Option(2),
    steps: list[int] = typer.Option([4, 44], help="The two step counts (per-step time from their difference; the "
                                                   "gap must dwarf start-up jitter, ~1-2 CPU-s on a shared machine)."),
    reps: int = typer.Option(3, help="Repetitions (each runs every variant at both step counts)."),
    only: list[str] = typer.Option([], help="Run only these variants (names in the module docstring)."),
    work: Path = typer.Option(ROOT / ".bench/vs_peers", help="Scratch directory (base model, data, runs, logs)."),
    out: Path = typer.Option(ROOT / "reports/bench/vs_peers.json", help="JSON report to write."),
) -> None:
    """Run far and the peers interleaved at two step counts; write per-step times, start-up and ratios."""
    from far.io import write_json

    if len(steps) != 2 or steps[0] >= steps[1]:
        raise typer.BadParameter("give two increasing step counts: --steps 4 --steps 44")
    n1, n2 = steps
    scripts = {"custom_diffusion": custom_diffusion, "dreambooth": dreambooth}
    variants = [v for v in VARIANTS if (v.tool == "far" or scripts[v.tool]) and (not only or v.name in only)]
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    if base is None:
        base = work / "base"
        write_params(work / "params_base.yaml", resolution, {})
        subprocess.run([sys.executable, "-m", "stages.base_model", "--out", str(base), "--params",
                        str(work / "params_base.yaml")], cwd=ROOT, check=True, env={**os.environ, **SINGLE_THREAD})
    parquet, instance = prepare_data(work, data, images, resolution)
    if (n_rows := len(list(instance.iterdir()))) > n1 * batch_size:
        print(f"note: {n_rows} images > {n1} x {batch_size}: far's first epoch (VAE-encoding each row once) is "
              "partly inside the per-step figure")
    ctx = {"base": base.resolve(), "parquet": parquet, "instance": instance, "resolution": resolution,
           "batch_size": batch_size, "scripts": scripts, "params": {}}
    for v in variants:
        if v.tool == "far":
            ctx["params"][v.name] = work / f"params_{v.name}.yaml"  # written before each run (the step count)
    state = {"before": machine_state()}
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    for rep in range(reps):
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]
        for v in order:
            runs[v.name].append({})
        for n in (n1, n2):
            for v in order:
                if v.tool == "far":  # the step count lives in the params file
                    write_params(ctx["params"][v.name], resolution, {"steps": n, "batch_size": batch_size,
                                                                      **(v.far_train or {})})
                run_dir = work / "runs" / v.name
                wall, cpu = run_once(command(v, n, ctx, run_dir), run_dir, work / "logs" / f"{v.name}_{n}.log")
                runs[v.name][-1][n] = {"wall": wall, "cpu": cpu}
                print(f"rep {rep + 1}/{reps} {v.name:12s} {n:3d} steps: wall {wall:7.2f} s, cpu {cpu:7.2f} s",
                      flush=True)
    state["after"] = machine_state()
    summary = summarise(runs, n1, n2)
    import torch

    report = {
        "base_model": str(base) if base != work / "base" else "embedded tiny (python -m stages.base_model)",
        "base_unet_config": json.loads((Path(base) / "unet" / "config.json").read_text()),
        "resolution": resolution, "batch_size": batch_size, "images": n_rows, "prompt": prompt(),
        "step_counts": [n1, n2], "repetitions": reps, "threads": 1, "precision": "fp32", "prior_preservation": False,
        "peer_scripts": {k: str(p) for k, p in scripts.items() if p},
        "torch": torch.__version__, "python": platform.python_version(), "machine": state,
        "variants": {v.name: {"tool": v.tool, "trains": v.modules, "command": command(v, n2, ctx, Path("<out>")),
                              **summary[v.name]} for v in variants},
        "ratios_s_per_step": ratios(summary),
        "ratio_note": "time per step of the first over the second: < 1 means the first is faster; "
                      "steps/s ratio = 1 / this",
    }
    report["readme_table"] = table(report)
    write_json(out, report)
    print(report["readme_table"])
    print(json.dumps(report["ratios_s_per_step"], indent=1))


if __name__ == "__main__":
    typer.run(main)
