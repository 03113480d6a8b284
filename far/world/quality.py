"""How well a world base model follows prompts, as the oracle reads its samples.

Prompts are the full captions of held-out random scenes (1 or 2 subjects), sampled with DDIM. Per prompt:
- single-subject prompts: `class` (the largest subject the oracle finds has the asked class), `body` (and
  the asked body colour), `part`, `pattern`;
- every prompt: `background` (the oracle's background is the asked one);
- two-subject prompts: `both_present` (the oracle finds at least two subjects whose classes cover the
  asked ones), `both_bound` (each asked subject found with its class and body colour).
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch

from far.world.captions import caption
from far.world.oracle import Oracle, Reading
from far.world.render import Scene, sample_scene


def quality_prompts(n: int, seed: int) -> list[Scene]:
    """n held-out scenes, half with one subject and half with two."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, 1 + (i % 2)) for i in range(n)]


@torch.no_grad()
def generate(
    pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 6.0, batch: int = 50
) -> np.ndarray:
    """(N, H, W, 3) uint8 samples, one per prompt, seeded per prompt index (independent of `batch`)."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(seed * 100003 + i + j) for j in range(len(chunk))]
        images = pipe(chunk, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, output_type="np").images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def _largest(reading: Reading):
    return max(reading.subjects, key=lambda s: s.mask.sum()) if reading.subjects else None


def score(scenes: list[Scene], readings: list[Reading]) -> dict[str, float]:
    """The agreement figures above, each a fraction of the prompts it applies to, with their counts."""
    hits: Counter = Counter()
    counts: Counter = Counter()
    for scene, r in zip(scenes, readings, strict=True):
        counts["background"] += 1
        hits["background"] += r.background == scene.background
        if len(scene.subjects) == 1:
            t, s = scene.subjects[0], _largest(r)
            for key, ok in (("class", s is not None and s.cls == t.cls),
                            ("body", s is not None and s.cls == t.cls and s.body == t.body),
                            ("part", s is not None and s.cls == t.cls and s.part == t.part),
                            ("pattern", s is not None and s.cls == t.cls and s.pattern == t.pattern)):
                counts[key] += 1
                hits[key] += ok
        else:
            found = Counter(s.cls for s in r.subjects)
            asked = Counter(s.cls for s in scene.subjects)
            counts["both_present"] += 1
            hits["both_present"] += len(r.subjects) >= 2 and not (asked - found)
            pairs = Counter((s.cls, s.body) for s in r.subjects)
            counts["both_bound"] += 1
            hits["both_bound"] += not (Counter((s.cls, s.body) for s in scene.subjects) - pairs)
    return {k: hits[k] / counts[k] for k in counts} | {f"n_{k}": counts[k] for k in counts}


def base_model_agreement(pipe, oracle: Oracle, n: int = 300, seed: int = 7, steps: int = 20,
                         guidance: float = 6.0) -> dict[str, float]:
    scenes = quality_prompts(n, seed)
    t0 = time.perf_counter()
    images = generate(pipe, [caption(s) for s in scenes], seed, steps, guidance)
    seconds = time.perf_counter() - t0
    return score(scenes, oracle.read(images)) | {"sample_seconds": round(seconds, 1), "steps": steps,
                                                  "guidance_scale": guidance}
