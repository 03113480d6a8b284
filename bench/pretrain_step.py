"""The world pretraining's UNet step under each speed option, side by side; writes reports/bench/pretrain_step.json.

One process, one thread (the pretraining runs on one), the world model's shipped architecture
(far/world/model.py) at its batch size: a step is what `far/world/pretrain.py`'s loop does (its
`denoising_loss`, backward, clipping, AdamW). Variants, each with its own copy of the same
initial weights, fed the same batches:

    eager          contiguous tensors (what pretraining uses)
    channels_last  UNet and its input in channels_last (what pretraining used until this bench)
    bf16           channels_last + CPU bf16 autocast
    compile        channels_last + torch.compile (inductor) of UNet and text encoder

Rounds are interleaved (each round runs every variant for `--steps-per-round` steps, in an order rotated per
round) so load from other processes hits all alike; the figure is the median step time over rounds, after
`--warmup` steps per variant (compilation happens there and is reported apart). Correctness: every variant's
losses on the same batches are recorded, and the largest difference to eager's is reported.

    python bench/pretrain_step.py --rounds 5 --steps-per-round 4
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("eager", "channels_last", "bf16", "compile")


def main(rounds: int = typer.Option(5), steps_per_round: int = typer.Option(4), warmup: int = typer.Option(3),
         threads: int = typer.Option(1), out: Path = typer.Option(ROOT / "reports/bench/pretrain_step.json")) -> None:
    from far.io import write_json
    from far.tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer
    from far.world.model import build_scheduler, build_text_encoder, build_unet, vae_factor
    from far.world.pretrain import PretrainConfig, denoising_loss

    torch.set_num_threads(threads)
    cfg = PretrainConfig()
    side = cfg.model.resolution // vae_factor(cfg.model)
    scheduler = build_scheduler()
    tokenizer = build_clip_tokenizer()
    captions = ["a spotted red dog with blue ears and a yellow cat with pink ears on the beach"] * cfg.batch_size
    ids = tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(step)
        x0 = torch.randn(cfg.batch_size, cfg.model.latent_channels, side, side, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        return scheduler.add_noise(x0, noise, t), noise, t

    base_te, base_unet = build_text_encoder(cfg.model, cfg.seed + 1), build_unet(cfg.model, cfg.seed + 2)
    runs = {}
    for name in VARIANTS:
        te, unet = copy.deepcopy(base_te).train(), copy.deepcopy(base_unet).train()
        if name != "eager":
            unet = unet.to(memory_format=torch.channels_last)
        params = list(te.parameters()) + list(unet.parameters())
        fwd_te, fwd_unet = (torch.compile(te), torch.compile(unet)) if name == "compile" else (te, unet)
        runs[name] = {"te": fwd_te, "unet": fwd_unet, "params": params, "step": 0, "times": [], "losses": [],
                      "opt": torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)}

    def step(name: str) -> float:
        r = runs[name]
        noisy, noise, t = batch(r["step"])
        if name != "eager":
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()
        t0 = time.perf_counter()
        with amp:
            loss = denoising_loss(r["unet"], r["te"], scheduler, noisy, noise, t, ids, cfg.min_snr_gamma)
        r["opt"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(r["params"], 1.0)
        r["opt"].step()
        elapsed = time.perf_counter() - t0
        r["losses"].append(loss.item())
        r["step"] += 1
        return elapsed

    warmup_s = {}
    for name in VARIANTS:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(name)
        warmup_s[name] = time.perf_counter() - t0
        print(f"warm-up {name:14s} {warmup_s[name]:7.1f} s ({warmup} steps)", flush=True)
    for k in range(rounds):
        order = VARIANTS[k % len(VARIANTS):] + VARIANTS[: k % len(VARIANTS)]
        for name in order:
            times = [step(name) for _ in range(steps_per_round)]
            runs[name]["times"].append(statistics.median(times))
        print(f"round {k + 1}/{rounds}: " + ", ".join(f"{n} {runs[n]['times'][-1]:.3f}" for n in VARIANTS), flush=True)

    eager = np.array(runs["eager"]["losses"])
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": threads,
                    "torch": torch.__version__},
        "batch_size": cfg.batch_size, "latent": [cfg.model.latent_channels, side, side],
        "rounds": rounds, "steps_per_round": steps_per_round, "warmup_steps": warmup,
        "variants": {
            name: {"s_per_step": statistics.median(r["times"]), "per_round": r["times"],
                   "warmup_s": warmup_s[name],
                   "speedup_vs_eager": statistics.median(runs["eager"]["times"]) / statistics.median(r["times"]),
                   "max_loss_diff_vs_eager": float(np.abs(np.array(r["losses"]) - eager).max())}
            for name, r in runs.items()
        },
    }
    write_json(out, result)
    for name, v in result["variants"].items():
        print(f"{name:14s} {v['s_per_step']:.3f} s/step  x{v['speedup_vs_eager']:.2f} vs eager  "
              f"warm-up {v['warmup_s']:.1f} s  max |loss - eager| {v['max_loss_diff_vs_eager']:.2e}")
    print(json.dumps({"written": str(out)}))


if __name__ == "__main__":
    typer.run(main)
