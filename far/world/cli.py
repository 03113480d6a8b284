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
