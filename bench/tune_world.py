"""Tuning of training params on the world, on prompts and seeds the evaluation never uses.

    python bench/tune_world.py --setting lr2e-3:learning_rate=2e-3 \
        --setting kv5e-4_tok5e-3:learning_rate=5e-4,token_learning_rate=5e-3

Each setting is `name:key=value,...` over the `train` section of --params (dotted keys: `refine.weight=0`;
`fusion.<key>` sets the `fusion` section; values parsed as YAML). For each one: `train` on the fusion set the
pipeline already made (data/fusion/train.parquet, models/base; with fusion keys, one composed for it), `sample`
the tuning prompts (`sample.prompt_set: world-tune`: no background named, so none of them is an evaluation
prompt) at seeds 100-107 (the evaluation uses 0-3), and the world verdict of the oracle. Training uses
--train-seed (default 9; the grid's seeds are 3-5). Writes reports/bench/tune_world.json, one entry per
setting; a setting already there with the same params is not run again (a killed run resumes at the next one).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import torch
import yaml

from far.config import load_params
from far.io import write_json

OUT = Path("reports/bench/tune_world.json")
SEEDS = list(range(100, 108))
DESCRIBED_SEEDS = list(range(100, 116))
FIGURES = {"single": ("identity", "likeness"), "multi": ("both", "likeness", "leakage", "duplicate")}


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    if not name or not body:
        raise SystemExit(f"--setting {text!r}: expected name:key=value,...")
    pairs = re.split(r",(?![^\[]*\])", body)  # commas inside [..] belong to a list value
    return name, {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def run_setting(params: Path, overrides: dict, train_seed: int, work: Path) -> dict:
    from far.config import Params
    from far.sample import run_sample
    from far.train import train
    from pipelines.ablation import set_param

    p = load_params(params)
    raw = p.model_dump(mode="json")
    raw["train"]["seed"] = train_seed
    for dotted, value in overrides.items():  # "refine.weight" is train.refine.weight; "fusion.num_multi" is fusion's
        set_param(raw, dotted if dotted.startswith("fusion.") else f"train.{dotted}", value, "--setting")
    try:
        tuned = Params.model_validate(raw)
    except ValueError as exc:  # pydantic's ValidationError names the unknown or invalid key
        raise SystemExit(f"--setting {overrides}: {exc}") from None
    train_cfg, fusion_cfg = tuned.train, tuned.fusion
    sample_cfg = p.sample.model_copy(update={"prompt_set": "world-tune", "seeds": SEEDS})
    if work.exists():
        shutil.rmtree(work)
    data = Path("data/fusion/train.parquet")
    if fusion_cfg != p.fusion:  # the setting changes the training set: compose it (the pipeline's fuse inputs)
        from far.fusion import fuse

        fuse(Path("data/segmented"), Path("data/priors"), work / "fusion", p.concepts, fusion_cfg, p.model.resolution)
        data = work / "fusion" / "train.parquet"
    t0 = time.perf_counter()
    train(train_cfg, p.concepts, Path("models/base"), data, work / "far",
          work / "ckpt", work / "live", log=lambda s: None, resolution=p.model.resolution)
    t_train = time.perf_counter() - t0
    run_sample(Path("models/base"), work / "far", work / "samples", sample_cfg, p.concepts,
               resolution=p.model.resolution)
    return {"train": {"seed": train_seed, **overrides}, "train_seconds": round(t_train, 1)} | judge(params, work)


def judge(params: Path, work: Path) -> dict:
    """The world verdict of the tuning samples in `work/samples` (also written as `work/world.csv`)."""
    from far.metrics import open_rgb, read_samples
    from far.world.concepts import world_truths
    from far.world.verdict import load_oracle, verdict

    p = load_params(params)
    truths = world_truths(p.concepts.subjects, required=True)
    block, images, _ = verdict(read_samples(work / "samples", p.concepts), load_oracle(p.eval.oracle), truths,
                               open_rgb)
    images.to_csv(work / "world.csv", index=False)
    figures = {f if kind == "single" else f"two_dog_{f}": block[kind][f] for kind, names in FIGURES.items()
               for f in names}
    return {"figures": figures, "n_images": {kind: block[kind]["n_images"] for kind in FIGURES},
            "per_concept_identity": {n: b["identity"] for n, b in block["per_concept"].items()}}


def described(params: Path, seeds: list[int]) -> dict:
    """The text path's ceiling: the base model asked for each concept in words ("a spotted red dog with blue
    ears", from its world.json), judged like the personalized samples: what a token could at best stand for."""
    import numpy as np

    from far.models import load_base_pipeline
    from far.world.captions import subject_phrase
    from far.world.concepts import world_truths
    from far.world.render import Subject
    from far.world.verdict import is_concept, likeness, load_oracle

    p = load_params(params)
    oracle = load_oracle(p.eval.oracle)
    pipe = load_base_pipeline("models/base")
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for name, dog in world_truths(p.concepts.subjects, required=True).items():
        prompt = subject_phrase(Subject(dog.cls, dog.body, dog.part, dog.pattern))
        images = pipe([prompt] * len(seeds), num_inference_steps=p.sample.num_inference_steps,
                      guidance_scale=p.sample.guidance_scale, height=p.model.resolution, width=p.model.resolution,
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        readings = oracle.read([np.asarray(im) for im in images])
        out[name] = {"prompt": prompt, "images": len(seeds),
                     "identity": float(np.mean([any(is_concept(s, dog) for s in r.subjects) for r in readings])),
                     "likeness": float(np.mean([likeness(r.subjects, dog) for r in readings]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", action="append", default=[], help="name:key=value,... over `train`")
    ap.add_argument("--rejudge", action="store_true",
                    help="judge every finished setting's samples again (after a change of the verdict or oracle)")
    ap.add_argument("--described", action="store_true",
                    help="also the base model asked for each concept in words (seeds 100-115): the `described` entry")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--train-seed", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(".tune"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    done = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.rejudge:
        for name, entry in done.items():
            if name != "described" and (args.work / name / "samples").is_dir():
                entry |= judge(Path(entry["key"]["params"]), args.work / name)
                print(f"{name}: {entry['figures']}")
        write_json(args.out, done)
    if args.described:
        done["described"] = {"key": {"params": str(args.params), "seeds": DESCRIBED_SEEDS},
                             "concepts": described(args.params, DESCRIBED_SEEDS)}
        write_json(args.out, done)
        print(f"described: {done['described']['concepts']}")
    for text in args.setting:
        name, overrides = parse_setting(text)
        key = {"params": str(args.params), "train_seed": args.train_seed, "overrides": overrides, "seeds": SEEDS}
        if done.get(name, {}).get("key") == key:
            print(f"{name}: done already {done[name]['figures']}")
            continue
        result = run_setting(args.params, overrides, args.train_seed, args.work / name)
        done[name] = {"key": key} | result
        write_json(args.out, done)  # after every setting: a killed run keeps what it finished
        print(f"{name}: {result['figures']} (train {result['train_seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
