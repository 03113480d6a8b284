"""The world's quality bars, measured: oracle accuracy, base-model agreement, CLIP zero-shot, times.

    python bench/world.py                                  # the shipped weights (far/world/weights)
    python bench/world.py --curve .world/pretrain/snapshots  # plus agreement against pretraining steps
    python bench/world.py --only clip                      # re-measure one part, keep the others' figures

Writes reports/bench/world.json. Held-out scenes use seeds that no training set used (base pool: 0,
oracle: 1000, CLIP: 2000; here 5000+). Agreement: --prompts full captions of held-out scenes (half one
subject, half two), DDIM --steps steps, guidance 6, read by the oracle (far/world/quality.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from far.io import write_json
from far.world.clip import zero_shot
from far.world.oracle import Oracle
from far.world.oracle_train import accuracy, render_set, round_trip
from far.world.quality import base_model_agreement
from far.world.render import render, sample_scene

WEIGHTS = Path("far/world/weights")
PARTS = ("oracle", "clip", "base", "curve")


def load_pipe(path: Path):  # noqa: ANN201
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, torch_dtype=torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=WEIGHTS / "base")
    ap.add_argument("--oracle", type=Path, default=WEIGHTS / "oracle.safetensors")
    ap.add_argument("--clip", type=Path, default=WEIGHTS / "clip.pt")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--curve", type=Path, default=None, help="folder of step-N snapshots to score too")
    ap.add_argument("--curve-prompts", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("reports/bench/world.json"))
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="measure only these parts (repeatable); the others' figures are kept from --out")
    args = ap.parse_args()
    parts = set(args.only or PARTS) - (set() if args.curve is not None else {"curve"})
    torch.set_num_threads(args.threads)
    oracle = Oracle.load(args.oracle)
    pipe = load_pipe(args.base)
    result: dict = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    machine = (f"{platform.processor() or platform.machine()}, {args.threads} threads, "
               f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    # Parts kept from an earlier run may have read other weights: each part records its own.
    measured = {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "weights": {"base": str(args.base), "oracle": str(args.oracle), "clip": str(args.clip)}}
    result.setdefault("measured", {}).update({part: measured for part in parts})

    if "oracle" in parts:
        images, _, _, scenes = render_set(5000, 1000, oracle.resolution)
        t0 = time.perf_counter()
        result["oracle_renders"] = accuracy(oracle, scenes, images)
        result["oracle_round_trips"] = accuracy(oracle, scenes, round_trip(pipe.vae, images))
        result["oracle_seconds_per_image"] = (time.perf_counter() - t0) / (2 * len(images))

    if "clip" in parts and args.clip.is_file():
        import clip

        model, _ = clip.load(str(args.clip), device="cpu", jit=False)
        rng = np.random.default_rng(5001)
        singles = [sample_scene(rng, 1) for _ in range(500)]
        result["clip_zero_shot"] = zero_shot(model.float().eval(), singles,
                                             np.stack([render(s, oracle.resolution)[0] for s in singles]))

    if "base" in parts:
        result["base_model"] = base_model_agreement(pipe, oracle, args.prompts, seed=5002, steps=args.steps)
        print(json.dumps(result["base_model"], indent=1), flush=True)
    if "curve" in parts:
        curve = []
        snaps = sorted(args.curve.glob("step-*"), key=lambda p: int(re.sub(r"\D", "", p.name)))
        for snap in snaps:
            row = base_model_agreement(load_pipe(snap), oracle, args.curve_prompts, seed=5003, steps=args.steps)
            curve.append({"step": int(re.sub(r"\D", "", snap.name))} | row)
            print(json.dumps(curve[-1]), flush=True)
        result["curve"] = curve
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
