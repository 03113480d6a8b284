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
    threads: int = typer.Option(1),
) -> None:
    """Train the oracle on renders and their VAE round trips; print its held-out accuracy."""
    import time

    import torch

    from far.world.oracle_train import OracleTrainConfig, accuracy, render_set, round_trip, train_oracle
    from far.world.weights import run_record, write_record

    torch.set_num_threads(threads)
    if render_share is not None and not 0.0 <= render_share <= 1.0:
        raise typer.BadParameter(f"{render_share} is not in [0, 1]", param_hint="--render-share")
    cfg = OracleTrainConfig(steps=steps, subject_width=subject_width, scenes=scenes, render_share=render_share)
    vae = _load_vae(work)
    t0 = time.perf_counter()
    oracle = train_oracle(cfg, vae)
    oracle.save(out, seed=cfg.seed, steps=cfg.steps, scenes=cfg.scenes)
    command = (f"far world oracle --work {work} --out {out} --steps {steps} --subject-width {subject_width} "
               + (f"--scenes {scenes} " if scenes != OracleTrainConfig.scenes else "")
               + (f"--render-share {render_share} " if render_share is not None else "")
               + f"--threads {threads}")
    record = run_record(command, cfg.seed, cfg.steps, time.perf_counter() - t0, scenes=cfg.scenes)
    write_record(out, record)  # what export reads
    images, _, _, scenes = render_set(cfg.seed + 500, 500, cfg.resolution)
    print("held-out renders:", accuracy(oracle, scenes, images))
    print("held-out round trips:", accuracy(oracle, scenes, round_trip(vae, images)))


@app.command("clip")
def clip_cmd(
    work: Path = typer.Option(Path(".world/pretrain"), help="pretrain work folder (its trained VAE is used)"),
    out: Path = typer.Option(Path(".world/clip.pt"), help="CLIP checkpoint to write"),
    steps: int = typer.Option(600),
    hard_negatives: bool = typer.Option(True, help="class- and body-swapped captions as negatives"),
    exchange_images: bool = typer.Option(False, help="body/part-exchanged scenes as image (and caption) negatives"),
    vision_width: int = typer.Option(128, help="image tower width (heads = width // 64)"),
    vision_layers: int = typer.Option(3, help="image tower transformer layers"),
    threads: int = typer.Option(1),
) -> None:
    """Train the world CLIP contrastively on scenes and captions; print (and record) its held-out zero-shot
    accuracy; `<out>.json` is the provenance record `far world export` reads."""
    import time

    import numpy as np
    import torch

    from far.world.clip import ClipTrainConfig, save_clip, train_clip, zero_shot
    from far.world.render import render, sample_scene
    from far.world.weights import run_record, write_record

    torch.set_num_threads(threads)
    cfg = ClipTrainConfig(steps=steps, hard_negatives=hard_negatives, exchange_images=exchange_images,
                          vision_width=vision_width,
                          vision_layers=vision_layers)
    t0 = time.perf_counter()
    model = train_clip(cfg, _load_vae(work))
    save_clip(model, out)
    rng = np.random.default_rng(cfg.seed + 500)
    scenes = [sample_scene(rng, 1) for _ in range(500)]
    held_out = zero_shot(model, scenes, np.stack([render(s, cfg.resolution)[0] for s in scenes]))
    flag = "--hard-negatives" if hard_negatives else "--no-hard-negatives"
    flag += " --exchange-images" if exchange_images else ""
    command = (f"far world clip --work {work} --out {out} --steps {steps} {flag} --vision-width {vision_width} "
               f"--vision-layers {vision_layers} --threads {threads}")
    record = run_record(command, cfg.seed, cfg.steps, time.perf_counter() - t0, scenes=cfg.scenes,
                        held_out_zero_shot=held_out)
    write_record(out, record)
    print("held-out zero-shot:", held_out)
