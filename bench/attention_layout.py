"""Heads x head dims of the tiny UNet's attention, measured per resolution; writes reports/bench/attention_layout.json.

diffusers reads the UNet config key `attention_head_dim` as the number of heads (its own comment says so), so
the tiny model's `model.tiny.attention_head_dim: 8` splits 32 channels into 8 heads of 4 dims. The split changes
no parameter (to_q/k/v/out are C x C whatever the heads), only how SDPA groups the channels.

1. Per level: the UNet's own Transformer2DModel at that level (built with h heads), forward + backward at its
   input size (batch 2, text context 77 tokens), input and the cross-attention to_k/to_v requiring grad as
   with `modules: crossattn_kv`. Head counts are interleaved in blocks; medians.
2. End to end: far's training step (bench/train.py's stepper: refine on, crossattn_kv + token rows) of the
   whole tiny model with each candidate `attention_head_dim` (the current one, the best single head count,
   the best per level), interleaved; medians.
Times are process CPU time by default (`--clock cpu`; meant for `--threads 1`), which load from other processes
inflates far less than wall time.

    python bench/attention_layout.py --threads 1
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_unet(heads, resolution: int):
    """The tiny pipeline's (unet, text encoder, DDPM scheduler) with `attention_head_dim = heads`."""
    from diffusers import DDPMScheduler

    from far.config import ModelConfig
    from far.models import build_tiny_pipeline

    cfg = ModelConfig(resolution=resolution)
    tiny = cfg.tiny.model_copy(update={"attention_head_dim": heads})  # unvalidated: a per-level list as well
    pipe = build_tiny_pipeline(tiny, resolution, cfg.seed)
    return pipe.unet, pipe.text_encoder, DDPMScheduler.from_config(pipe.scheduler.config)


def levels(unet, resolution: int) -> list[tuple[str, object, int, int]]:
    """(name, transformer module, channels, side) for each resolution with attention (down blocks, mid)."""
    side = resolution // 8
    out = []
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "attentions", None):
            mod = block.attentions[0]
            out.append((f"down{i}", mod, mod.config.in_channels, side >> i))
    mid = unet.mid_block.attentions[0]
    out.append(("mid", mid, mid.config.in_channels, side >> (len(unet.down_blocks) - 1)))
    return out


def attention_counts(unet) -> dict[str, int]:
    """Transformer2DModels per level: down block i and the up block at the same resolution; the mid block."""
    n = len(unet.down_blocks)
    counts = {f"down{i}": len(getattr(unet.down_blocks[i], "attentions", []))
              + len(getattr(unet.up_blocks[n - 1 - i], "attentions", [])) for i in range(n)}
    return {**counts, "mid": len(unet.mid_block.attentions)}


def level_stepper(module, channels: int, side: int, batch: int, context_dim: int):
    import torch

    module.requires_grad_(False)
    for blk in module.transformer_blocks:
        blk.attn2.to_k.weight.requires_grad_(True)
        blk.attn2.to_v.weight.requires_grad_(True)
    module.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, side, side, generator=g, requires_grad=True)
    ctx = torch.randn(batch, 77, context_dim, generator=g)

    def step() -> None:
        module(x, encoder_hidden_states=ctx).sample.square().mean().backward()

    return step


def interleaved(steppers: dict, steps: int, block: int, clock=time.process_time) -> dict[str, float]:
    """Median seconds per call of each stepper, run in alternating blocks after 2 warm-up calls each."""
    for s in steppers.values():
        s()
        s()
    times: dict = {k: [] for k in steppers}
    while min(len(t) for t in times.values()) < steps:
        for k, s in steppers.items():
            for _ in range(block):
                t0 = clock()
                s()
                times[k].append(clock() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def main(
    out: Path = typer.Option(ROOT / "reports/bench/attention_layout.json", help="JSON report to write."),
    resolution: int = typer.Option(256),
    batch_size: int = typer.Option(2),
    heads: list[int] = typer.Option([1, 2, 4, 8], help="Head counts tried at every level."),
    steps: int = typer.Option(20, help="timed calls per head count and level."),
    e2e_steps: int = typer.Option(15, help="timed training steps per candidate layout."),
    block: int = typer.Option(5),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)."),
    clock: str = typer.Option("cpu", help="cpu (process CPU time: steadier on a shared machine, single thread) "
                                          "| wall"),
) -> None:
    """Time each level at each head count, then whole training steps with the candidate layouts."""
    import torch

    from bench.train import make_stepper
    from far.config import TinyModelConfig
    from far.io import write_json

    if threads:
        torch.set_num_threads(threads)
    tick = {"cpu": time.process_time, "wall": time.perf_counter}[clock]
    current = TinyModelConfig().attention_head_dim
    unets = {h: tiny_unet(h, resolution)[0] for h in heads}
    names = [name for name, *_ in levels(unets[heads[0]], resolution)]
    counts = attention_counts(unets[heads[0]])
    per_level: dict[str, dict] = {}
    for li, name in enumerate(names):
        steppers = {}
        for h in heads:
            _, mod, c, side = levels(unets[h], resolution)[li]
            if c % h == 0:
                steppers[h] = level_stepper(mod, c, side, batch_size, unets[h].config.cross_attention_dim)
        med = interleaved(steppers, steps, block, tick)
        per_level[name] = {"channels": c, "side": side, "modules": counts[name],
                           "ms": {f"{h}x{c // h}": round(1e3 * t, 2) for h, t in med.items()},
                           "best_heads": min(med, key=med.get)}
        print(name, per_level[name], flush=True)
    n_down = len(unets[heads[0]].down_blocks)
    # per down level (the up blocks reuse it reversed); the last down level (no attention) sets the mid block's
    by_level = [per_level.get(f"down{i}", per_level["mid"])["best_heads"] for i in range(n_down - 1)]
    by_level.append(per_level["mid"]["best_heads"])
    total = {h: sum(lv["modules"] * lv["ms"].get(f"{h}x{lv['channels'] // h}", float("inf"))
                    for lv in per_level.values()) for h in heads}  # one head count everywhere, weighted by use
    best_uniform = min(total, key=total.get)
    candidates = {"current": current, "uniform": best_uniform, "per_level": by_level}
    layouts = {}
    for key, value in candidates.items():
        if value not in layouts.values():
            layouts[key] = value
    args = {"device": "cpu", "full_size": False, "resolution": resolution, "batch_size": batch_size,
            "dtype": "fp32", "gradient_checkpointing": False}
    steppers = {k: make_stepper("on", args, tiny_unet(v, resolution)) for k, v in layouts.items()}
    e2e = interleaved(steppers, e2e_steps, block, tick)
    base = e2e["current"]
    report = {
        "model": "embedded tiny (far.models.build_tiny_pipeline)", "resolution": resolution,
        "batch_size": batch_size, "torch_threads": torch.get_num_threads(), "clock": clock,
        "note": "attention_head_dim is read by diffusers as the number of heads; 'HxD' = H heads of D dims",
        "per_level_forward_backward": per_level,
        "end_to_end_train_step": {k: {"attention_head_dim": layouts[k], "s_per_step": round(t, 4),
                                      "speedup_vs_current": round(base / t, 3)} for k, t in e2e.items()},
    }
    write_json(out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    typer.run(main)
