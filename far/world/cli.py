"""`far world ...`: make the world's shipped weights (base model, oracle, CLIP) and measure them."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="The world: a procedural scene renderer and models trained on it.")


@app.command("pretrain")
def pretrain_cmd(
    work: Path = typer.Option(Path(".world/pretrain"), help="work folder: checkpoints, caches, snapshots (resumable)"),
    steps: int = typer.Option(8000, help="UNet + text encoder optimizer steps"),
    vae_steps: int = typer.Option(1200, help="VAE optimizer steps"),
    pool_size: int = typer.Option(24000, help="rendered training scenes"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch CPU threads (bit-identical results need the same count)"),
) -> None:
    """Pretrain the world's text-to-image model from scratch (resumes from --work)."""
    from far.world.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(seed=seed, steps=steps, vae_steps=vae_steps, pool_size=pool_size)
    print(f"final model: {pretrain(cfg, work, threads)}")


@app.command("export")
def export_cmd(
    snapshot: Path = typer.Option(..., help="pretrain snapshot to ship, e.g. .world/pretrain/snapshots/step-8000"),
    oracle: Path = typer.Option(Path(".world/oracle.safetensors"), help="oracle weights (far world oracle)"),
    clip: Path = typer.Option(Path(".world/clip.pt"), help="world CLIP checkpoint (far world clip)"),
    base_record: Path | None = typer.Option(None, help="pretraining provenance JSON; default: the snapshot's own"),
    oracle_record: Path | None = typer.Option(None, help="oracle provenance JSON; default: <oracle>.json if present"),
    clip_record: Path | None = typer.Option(None, help="CLIP provenance JSON; default: <clip>.json if present"),
    dest: Path | None = typer.Option(None, help="folder to write; default: far/world/weights (shipped)"),
    allow_unknown_provenance: bool = typer.Option(False, help="export even if a command/seed/steps/time is unknown"),
) -> None:
    """Write the shipped weights (base in fp16, oracle, CLIP) and MANIFEST.json with hashes and provenance."""
    from far.world.weights import export_weights

    records = {"base": base_record, "oracle": oracle_record, "clip": clip_record}
    manifest = export_weights(snapshot, oracle, clip, records, dest, allow_unknown_provenance)
    total = sum(f["size"] for f in manifest["files"].values())
    print(f"exported {len(manifest['files'])} files ({total / 2**20:.1f} MiB) to {dest or 'far/world/weights'}")
    for name, keys in manifest["unknown"].items():
        print(f"warning: {name} provenance unknown: {', '.join(keys)}")


@app.command("concepts")
def concepts_cmd(
    out: Path = typer.Option(Path("data/concepts"), help="folder that receives one concept folder per world dog"),
    pair: list[str] = typer.Option(["default", "pair2"], help="which pairs of far/world/concepts.py PAIRS"),
) -> None:
    """Render the world dogs' reference scenes as concept folders (images, masks, world.json)."""
    from far.world.concepts import PAIRS, write_concept

    unknown = sorted(set(pair) - set(PAIRS))
    if unknown:
        raise typer.BadParameter(f"--pair: {unknown} unknown; known: {sorted(PAIRS)}")
    for name in pair:
        for dog in PAIRS[name]:
            print(f"{name}: {write_concept(dog, out)} ({dog.body} {dog.cls}, {dog.part} part, {dog.pattern}; "
                  f"references on {', '.join(dog.backgrounds)})")


def _load_vae(work: Path):  # noqa: ANN202 - diffusers AutoencoderKL
    from diffusers import AutoencoderKL

    vae_dir = work / "vae"
    if not (vae_dir / "config.json").is_file():
        raise typer.BadParameter(f"{vae_dir}: no trained VAE yet; run `far world pretrain --work {work}` first")
    latents = work / "latents.pt"
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    if latents.is_file():
        import torch

        vae.register_to_config(scaling_factor=torch.load(latents, weights_only=True)["scaling_factor"])
    return vae


@app.command("decoder")
def decoder_cmd(
    snapshot: Path = typer.Option(Path("far/world/weights/base"), help="base model (diffusers directory) to improve"),
    work: Path = typer.Option(Path(".world/decoder"), help="work folder: the resumable checkpoint"),
    out: Path = typer.Option(Path(".world/base_decoder"), help="the snapshot with the tuned VAE, to write"),
    steps: int = typer.Option(2000),
    threads: int = typer.Option(1),
) -> None:
    """Fine-tune the base model's VAE decoder (encoder frozen: the latent space is unchanged) so that parts
    keep their colours; writes the whole snapshot with the new VAE and `<out>.json`, its provenance record."""
    import shutil
    import time

    import torch
    from diffusers import AutoencoderKL

    from far.io import atomic_dir
    from far.world.decoder import DecoderTuneConfig, tune_decoder
    from far.world.weights import base_provenance, run_record, write_record

    torch.set_num_threads(threads)
    cfg = DecoderTuneConfig(steps=steps)
    vae = AutoencoderKL.from_pretrained(snapshot / "vae", torch_dtype=torch.float32)
    t0 = time.perf_counter()
    vae = tune_decoder(cfg, vae, work)
    wall = time.perf_counter() - t0
    with atomic_dir(out) as tmp:
        shutil.copytree(snapshot, tmp, dirs_exist_ok=True)
        shutil.rmtree(tmp / "vae")
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
    command = f"far world decoder --snapshot {snapshot} --work {work} --out {out} --steps {steps} --threads {threads}"
    own = run_record(command, cfg.seed, cfg.steps, wall, config=cfg.to_dict())
    before = base_provenance(snapshot)
    record = before | {
        "command": " && ".join(c for c in (before.get("command"), command) if c),
        "wall_time_s": round(float(before.get("wall_time_s", 0.0)) + own["wall_time_s"], 1),
        "decoder": own,
    }
    write_record(out, record)
    print(f"wrote {out} and {out}.json")


@app.command("oracle")
def oracle_cmd(
    work: Path = typer.Option(Path(".world/pretrain"), help="pretrain work folder (its trained VAE is used)"),
    out: Path = typer.Option(Path(".world/oracle.safetensors"), help="oracle weights to write"),
    steps: int = typer.Option(1500),
    subject_width: int = typer.Option(32, help="channels of the crop reader's first block (SubjectNet)"),
    scenes: int = typer.Option(6000, help="rendered training scenes (each also round tripped, with and without noise)"),
    render_share: float | None = typer.Option(
        None, help="share of clean renders in a batch (the rest: round trips, half of them noisy); default: a third"),
    init: Path | None = typer.Option(None, help="oracle weights to train on from (same widths), instead of scratch"),
    seed: int = typer.Option(1000, help="draws the training scenes (held-out checks use seed + 500)"),
    lr: float = typer.Option(2e-3, help="peak learning rate (cosine schedule)"),
    threads: int = typer.Option(1),
) -> None:
    """Train the oracle on renders and their VAE round trips; print its held-out accuracy."""
    import time

    import torch

    from far.world.oracle import Oracle
    from far.world.oracle_train import OracleTrainConfig, accuracy, render_set, round_trip, train_oracle
    from far.world.weights import record_path, run_record, write_record

    torch.set_num_threads(threads)
    if render_share is not None and not 0.0 <= render_share <= 1.0:
        raise typer.BadParameter(f"{render_share} is not in [0, 1]", param_hint="--render-share")
    cfg = OracleTrainConfig(steps=steps, subject_width=subject_width, scenes=scenes, render_share=render_share,
                            seed=seed, lr=lr)
    before = _init_record(init, "oracle")
    vae = _load_vae(work)
    t0 = time.perf_counter()
    oracle = train_oracle(cfg, vae, init=Oracle.load(init) if init is not None else None)
    oracle.save(out, seed=cfg.seed, steps=cfg.steps, scenes=cfg.scenes)
    command = (f"far world oracle --work {work} --out {out} --steps {steps} --subject-width {subject_width} "
               + (f"--scenes {scenes} " if scenes != OracleTrainConfig.scenes else "")
               + (f"--render-share {render_share} " if render_share is not None else "")
               + _start_flags(init, seed, lr, OracleTrainConfig()) + f"--threads {threads}")
    record = run_record(command, cfg.seed, cfg.steps, time.perf_counter() - t0, scenes=cfg.scenes)
    if before is not None:
        record = _chained(before, record, init)
    write_record(out, record)  # what export reads
    images, _, _, scenes = render_set(cfg.seed + 500, 500, cfg.resolution)
    print("held-out renders:", accuracy(oracle, scenes, images))
    print("held-out round trips:", accuracy(oracle, scenes, round_trip(vae, images)))
    print(f"wrote {out} and {record_path(out)}")


def _start_flags(init: Path | None, seed: int, lr: float, default) -> str:  # noqa: ANN001 - a train config
    """The recorded command's --init/--seed/--lr: all three after --init, else those that differ from default."""
    if init is not None:
        return f"--init {init} --seed {seed} --lr {lr} "
    return (f"--seed {seed} " if seed != default.seed else "") + (f"--lr {lr} " if lr != default.lr else "")


def _init_record(init: Path | None, what: str) -> dict | None:
    """The provenance record of the weights a run starts from, checked before minutes of work: `<init>.json`,
    or for the shipped weights (verified first) their entry in MANIFEST.json."""
    import json

    from far.world import paths
    from far.world.weights import check, load_manifest, record_path

    if init is None:
        return None
    if not init.is_file():
        raise typer.BadParameter(f"{init}: no such {what} weights file", param_hint="--init")
    shipped = {"oracle": paths.ORACLE, "CLIP": paths.CLIP}[what]
    if init.resolve() == shipped.resolve():
        check(shipped.name)
        return load_manifest()[what.lower()]
    path = record_path(init)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: the record of the weights to start from could not be read ({exc}); "
                                 "its provenance would be lost", param_hint="--init") from None


def _chained(before: dict, own: dict, init: Path) -> dict:
    """A record for weights trained on from `init`: its commands chained after the earlier ones, the wall time
    summed, the earlier record kept whole under "init"."""
    from far.io import file_sha256

    return own | {"command": " && ".join(c for c in (before.get("command"), own["command"]) if c),
                  "steps_total": int(before.get("steps_total", before.get("steps", 0))) + own["steps"],
                  "wall_time_s": round(float(before.get("wall_time_s", 0.0)) + own["wall_time_s"], 1),
                  "init": before | {"sha256": file_sha256(init)}}


@app.command("clip")
def clip_cmd(
    work: Path = typer.Option(Path(".world/pretrain"), help="pretrain work folder (its trained VAE is used)"),
    out: Path = typer.Option(Path(".world/clip.pt"), help="CLIP checkpoint to write"),
    steps: int = typer.Option(600),
    hard_negatives: bool = typer.Option(True, help="class- and body-swapped captions as negatives"),
    exchange_images: bool = typer.Option(False, help="body/part-exchanged scenes as image (and caption) negatives"),
    exchange_weight: float = typer.Option(
        0.0, help="weight of the per-scene choice between a scene and its exchanged version (needs --exchange-images)"),
    vision_width: int = typer.Option(128, help="image tower width (heads = width // 64)"),
    vision_layers: int = typer.Option(3, help="image tower transformer layers"),
    init: Path | None = typer.Option(None, help="CLIP checkpoint (same sizes) to train on from, instead of scratch"),
    seed: int = typer.Option(2000, help="draws the training scenes (held-out checks use seed + 500)"),
    lr: float = typer.Option(1e-3, help="peak learning rate (cosine schedule)"),
    threads: int = typer.Option(1),
) -> None:
    """Train the world CLIP contrastively on scenes and captions; print (and record) its held-out zero-shot
    accuracy; `<out>.json` is the provenance record `far world export` reads. Resumable: the run checkpoints
    to `<out>.ckpt` every 100 steps, and the same command, run again, goes on from there."""
    import time

    import numpy as np
    import torch

    from far.world.clip import ClipTrainConfig, save_clip, train_clip, zero_shot
    from far.world.render import render, sample_scene
    from far.world.weights import record_path, run_record, write_record

    torch.set_num_threads(threads)
    cfg = ClipTrainConfig(steps=steps, hard_negatives=hard_negatives, exchange_images=exchange_images,
                          vision_width=vision_width, vision_layers=vision_layers, seed=seed, lr=lr,
                          exchange_weight=exchange_weight)
    if exchange_weight and not exchange_images:
        raise typer.BadParameter("needs --exchange-images (the exchanged scenes it chooses between)",
                                 param_hint="--exchange-weight")
    before = _init_record(init, "CLIP")
    checkpoint = out.with_name(out.name + ".ckpt")
    resumed_at = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]) \
        if checkpoint.is_file() else 0
    t0 = time.perf_counter()
    try:
        model = train_clip(cfg, _load_vae(work), init=init, checkpoint=checkpoint)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--init / --out") from None
    save_clip(model, out)
    rng = np.random.default_rng(cfg.seed + 500)
    scenes = [sample_scene(rng, 1) for _ in range(500)]
    held_out = zero_shot(model, scenes, np.stack([render(s, cfg.resolution)[0] for s in scenes]))
    flag = "--hard-negatives" if hard_negatives else "--no-hard-negatives"
    flag += " --exchange-images" if exchange_images else ""
    flag += f" --exchange-weight {exchange_weight}" if exchange_weight else ""
    command = (f"far world clip --work {work} --out {out} --steps {steps} {flag} --vision-width {vision_width} "
               f"--vision-layers {vision_layers} " + _start_flags(init, seed, lr, ClipTrainConfig())
               + f"--threads {threads}")
    record = run_record(command, cfg.seed, cfg.steps, time.perf_counter() - t0, scenes=cfg.scenes,
                        held_out_zero_shot=held_out)
    if resumed_at:
        record["resumed_at_step"] = resumed_at  # wall_time_s counts this last run only
    if before is not None:
        record = _chained(before, record, init)
    write_record(out, record)
    checkpoint.unlink(missing_ok=True)
    print("held-out zero-shot:", held_out)
    print(f"wrote {out} and {record_path(out)}")
