"""Benchmark one training step with Localized Refinement on and off; writes reports/bench/train.json.

Same model, batch, resolution and trainable modules (crossattn_kv + token embeddings) in both modes; the
step is `far.train.step_loss` + backward + AdamW. "off" is the plain fused SDPA processor everywhere and no
refine term; "on" installs `ConceptAttnProcessor` in the refine layers and adds the refine loss. Steps of
the two modes are interleaved in blocks so that load from other processes hits both alike; the figures
are medians. Each step's CPU time (the process's, all threads) is recorded beside its wall time: on a shared
CPU another job's load stretches wall time but not CPU time, so the CPU ratio is the steadier one there.
Peak memory: CUDA max allocated per mode; on CPU the peak RSS of a separate short run per mode.

    python bench/train.py                                   # default tiny model, CPU (the embedded config)
    python bench/train.py --device cuda --full-size --batch-size 4 --gradient-checkpointing --dtype bf16
      # SD 2.1-architecture UNet + OpenCLIP-H-sized text encoder, random weights, 512 px (GPU)
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(full_size: bool, resolution: int):
    """(unet, text_encoder, scheduler config) with random (tiny: the embedded model's) weights."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from far.config import ModelConfig
    from far.models import build_tiny_pipeline

    if not full_size:
        cfg = ModelConfig(resolution=resolution)
        pipe = build_tiny_pipeline(cfg.tiny, resolution, cfg.seed)
        return pipe.unet, pipe.text_encoder, DDPMScheduler.from_config(pipe.scheduler.config)
    unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-2-1-base unet/config.json
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, use_linear_projection=True,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49410, hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                        hidden_act="gelu", projection_dim=512))
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction")
    return unet, text, sched


def synthetic_batch(batch_size: int, resolution: int, factors: list[int], seed: int = 0):
    """Two concepts side by side (rectangle masks), identifiers at fixed prompt positions."""
    import torch

    from far.attention import selection_matrix
    from far.losses import downsample_mask
    from far.trainset import Batch

    g = torch.Generator().manual_seed(seed)
    h = resolution // 8
    masks = torch.zeros(batch_size, 2, h, h, dtype=torch.bool)
    masks[:, 0, h // 4 : 3 * h // 4, : h // 2] = True
    masks[:, 1, h // 4 : 3 * h // 4, h // 2 :] = True
    ids = torch.full((batch_size, 77), 49407)
    ids[:, :9] = torch.tensor([49406, 320, 1125, 539, 49408, 1929, 537, 49409, 1929])
    sel, valid = selection_matrix(ids, [[49408], [49409]])
    by_f = {f: downsample_mask(masks, (h // f, h // f)).flatten(2) for f in sorted({1, *factors})}
    return Batch(latents=torch.randn(batch_size, 4, h, h, generator=g), input_ids=ids, selection=sel, valid=valid,
                 masks=by_f, union=masks.any(1, keepdim=True).float(), has_mask=torch.ones(batch_size, dtype=bool),
                 is_prior=torch.zeros(batch_size, dtype=bool))


def make_stepper(mode: str, args: dict, models: tuple | None = None):
    """A function running one full training step in `mode` ('on' | 'off'), on its own model copy.

    `models`: (unet, text_encoder, scheduler) to use instead of `build(...)` (bench/attention_layout.py)."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from far.attention import AttentionCollector, install_concept_processors, select_layers
    from far.config import TrainConfig
    from far.modules import select_trainable
    from far.train import step_loss

    device = torch.device(args["device"])
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args["dtype"]]
    torch.manual_seed(0)
    unet, text, sched = models or build(args["full_size"], args["resolution"])
    cfg = TrainConfig(batch_size=args["batch_size"])
    cfg.refine.downscale = [32]
    cfg.refine.weight = 0.1 if mode == "on" else 0.0
    text.resize_token_embeddings(49410, mean_resizing=False)  # two identifier tokens, as add_concept_tokens does
    trainable = select_trainable(unet, text, "crossattn_kv", [49408, 49409])
    layers = select_layers(unet, cfg.refine.downscale, 8)  # both models' VAEs downsample 8x
    collector = AttentionCollector()
    if mode == "on":
        install_concept_processors(unet, collector, layers)
    else:
        unet.set_attn_processor(AttnProcessor2_0())
    if args["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    text.to(device)
    params = list(trainable.unet_params.values()) + [trainable.embedding]
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch = synthetic_batch(args["batch_size"], args["resolution"], sorted(set(layers.values())))
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = step_loss(batch, unet, text, sched, collector, layers, cfg, gen, device, need_maps=mode == "on")
        loss.backward()
        collector.stop()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def peak_memory_child(mode: str, args: dict) -> None:
    """Child process: a few steps in one mode, print the peak memory in MiB."""
    import torch

    step = make_stepper(mode, args)
    for _ in range(3):
        step()
    if args["device"] == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(
    out: Path = typer.Option(ROOT / "reports/bench/train.json", help="JSON report to write."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    full_size: bool = typer.Option(False, help="SD 2.1-architecture UNet/text encoder with random weights."),
    resolution: int = typer.Option(None, help="px; default 256 (tiny) or 512 (full size)."),
    batch_size: int = typer.Option(2),
    steps: int = typer.Option(30, help="timed steps per mode (after 3 warm-up steps each)."),
    block: int = typer.Option(5, help="steps per mode before switching (interleaving)."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (autocast)"),
    gradient_checkpointing: bool = typer.Option(False),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)."),
    child: str = typer.Option("", hidden=True),
) -> None:
    """Measure refine-on vs refine-off training steps; write steps/s, images/s, peak memory and the ratio."""
    import torch

    from far.io import write_json

    if threads:
        torch.set_num_threads(threads)
    resolution = resolution or (512 if full_size else 256)
    args = {"device": device, "full_size": full_size, "resolution": resolution, "batch_size": batch_size,
            "dtype": dtype, "gradient_checkpointing": gradient_checkpointing}
    if child:
        peak_memory_child(child, args)
        return
    steppers = {m: make_stepper(m, args) for m in ("off", "on")}
    for s in steppers.values():
        for _ in range(3):
            s()
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu_times: dict[str, list[float]] = {"off": [], "on": []}
    while len(times["on"]) < steps:
        for mode in ("off", "on"):
            for _ in range(block):
                t0, c0 = time.perf_counter(), time.process_time()
                steppers[mode]()
                times[mode].append(time.perf_counter() - t0)
                cpu_times[mode].append(time.process_time() - c0)
    peak = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--child", mode, "--device", device, "--resolution", str(resolution),
               "--batch-size", str(batch_size), "--dtype", dtype, "--threads", str(threads)]
        cmd += ["--full-size"] if full_size else []
        cmd += ["--gradient-checkpointing"] if gradient_checkpointing else []
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peak[mode] = float(res.stdout.strip().splitlines()[-1])
    med = {m: statistics.median(t) for m, t in times.items()}
    cpu_med = {m: statistics.median(t) for m, t in cpu_times.items()}
    report = {
        "model": "sd2.1-architecture, random weights" if full_size else "embedded tiny (models/base default)",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'cpu'})",
        "torch_threads": torch.get_num_threads(), "resolution": resolution, "batch_size": batch_size,
        "dtype": dtype, "gradient_checkpointing": gradient_checkpointing, "modules": "crossattn_kv + tokens",
        "refine_layers_downscale": 32, "timed_steps_per_mode": len(times["on"]),
        "step_s": {m: round(v, 5) for m, v in med.items()},
        "steps_per_s": {m: round(1 / v, 3) for m, v in med.items()},
        "images_per_s": {m: round(batch_size / v, 3) for m, v in med.items()},
        "peak_memory_mib": {m: round(v, 1) for m, v in peak.items()},
        "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process peak RSS (ru_maxrss)",
        "refine_overhead_ratio": round(med["on"] / med["off"], 4),
        "target_refine_overhead_ratio": 1.05,
    }
    if device == "cpu":  # on a GPU the host's CPU time says nothing of the kernels'
        report["cpu_step_s"] = {m: round(v, 5) for m, v in cpu_med.items()}
        report["refine_overhead_ratio_cpu"] = round(cpu_med["on"] / cpu_med["off"], 4)
    write_json(out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    typer.run(main)
