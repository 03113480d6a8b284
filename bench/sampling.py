"""Sampling speed of the `sample` stage's own code path; writes reports/bench/sampling.json.

Builds a Stable Diffusion pipeline (the SD 2.1 architecture with random weights, or the embedded tiny model),
registers the two shipped concepts' identifiers, and times `far.sample.generate` (attention capture in the
16x16-at-512-px layers included, PNG and .npy writing included) on batches of `sample.batch_size` prompts,
`sample.num_inference_steps` steps, classifier-free guidance as in params.yaml. The stage runs the pipeline
in fp32 (`far.models.load_base_pipeline`); `--dtype bf16` casts it, to show what that would give.

    python bench/sampling.py --device cuda --full-size --dtype bf16      # bench/gpu.sh
    python bench/sampling.py --resolution 128 --batches 1                # tiny, CPU
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pipeline(full_size: bool, resolution: int):
    """The tiny pipeline, or the SD 2.1-base architecture (UNet, OpenCLIP-H-sized text encoder, VAE), random."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from bench.train import build
    from far.tokenizer import build_clip_tokenizer

    if not full_size:
        from far.config import ModelConfig
        from far.models import build_tiny_pipeline

        cfg = ModelConfig(resolution=resolution)
        return build_tiny_pipeline(cfg.tiny, resolution, cfg.seed)
    unet, text, _ = build(full_size, resolution)
    vae = AutoencoderKL(  # stabilityai/stable-diffusion-2-1-base vae/config.json
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=768,
    )
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def main(
    out: Path = typer.Option(ROOT / "reports/bench/sampling.json", help="JSON report to write."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    full_size: bool = typer.Option(False, help="SD 2.1-architecture UNet, text encoder and VAE, random weights."),
    resolution: int = typer.Option(None, help="px; default 256 (tiny) or 512 (full size)."),
    dtype: str = typer.Option("fp32", help="fp32 (as the stage runs) | bf16 | fp16 (weights cast)"),
    batches: int = typer.Option(3, help="timed batches (after one warm-up batch)."),
    batch_size: int = typer.Option(None, help="prompts per batch; default sample.batch_size of params.yaml."),
    steps: int = typer.Option(None, help="denoising steps; default sample.num_inference_steps."),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)."),
) -> None:
    """Time far.sample.generate per batch; write images/s (median over batches)."""
    import torch

    from far.concepts import add_concept_tokens
    from far.config import load_params
    from far.io import write_json
    from far.prompts import prompts_for
    from far.sample import Job, generate

    if threads:
        torch.set_num_threads(threads)
    resolution = resolution or (512 if full_size else 256)
    params = load_params(ROOT / "params.yaml")
    cfg = params.sample.model_copy(update={k: v for k, v in
                                           {"batch_size": batch_size, "num_inference_steps": steps}.items() if v})
    concepts = params.concepts.model_copy(deep=True)
    for c in concepts.subjects:
        c.images = str(ROOT / c.images)
    torch.manual_seed(0)
    pipe = pipeline(full_size, resolution)
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts.subjects)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    pipe.to(device=device, dtype=torch_dtype)
    specs = prompts_for(cfg, concepts)
    jobs = [Job(specs[i % len(specs)], seed) for seed in range(batches + 1) for i in range(cfg.batch_size)]
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in range(batches + 1):
            batch = jobs[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            batch = [Job(j.spec, 1000 * b + k) for k, j in enumerate(batch)]  # distinct stems: nothing is skipped
            t0 = time.perf_counter()
            generate(pipe, batch, concepts, cfg, Path(tmp) / str(b), resolution=resolution)
            if device == "cuda":
                torch.cuda.synchronize()
            if b:  # the first batch warms up (kernels, allocator)
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    report = {
        "model": "sd2.1-architecture, random weights" if full_size else "embedded tiny",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
        "torch_threads": torch.get_num_threads(), "resolution": resolution, "batch_size": cfg.batch_size,
        "num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
        "scheduler": type(pipe.scheduler).__name__, "timed_batches": len(times),
        "s_per_batch": round(med, 4), "images_per_s": round(cfg.batch_size / med, 3),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
    }
    write_json(out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    typer.run(main)
