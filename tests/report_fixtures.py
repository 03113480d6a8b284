"""Upstream outputs in their documented formats, built from the shipped concept photos, for report tests.

Only tests use these (the report stage never fabricates inputs). Images are the real DreamBench photos;
masks are simple ellipses; curves and metrics have the shapes dvclive and the evaluate stage write.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from far.dataset import encode_png, write_training_set
from tests.conftest import ROOT

CONCEPTS = {"dog": "<far-dog>", "dog3": "<far-dog3>"}


def _photo(concept: str, i: int, size: int = 128) -> np.ndarray:
    path = sorted((ROOT / "data/concepts" / concept).glob("*.jpg"))[i]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size)))


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """(size, size) {0,1} uint8 mask."""
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (int(cx * size), int(cy * size)), (int(rx * size), int(ry * size)), 0, 0, 360, 1, -1)
    return mask


def segmented(dest: Path, per_concept: int = 2) -> Path:
    rows = []
    for concept in CONCEPTS:
        (dest / concept).mkdir(parents=True, exist_ok=True)
        for i in range(per_concept):
            rgb, mask = _photo(concept, i), _ellipse(128, 0.5, 0.55, 0.3, 0.35)
            Image.fromarray(rgb).save(dest / concept / f"{i:02d}.png")
            Image.fromarray(mask * 255).save(dest / concept / f"{i:02d}_mask.png")
            Image.fromarray(np.dstack([rgb, mask * 255])).save(dest / concept / f"{i:02d}_cutout.png")
            rows.append({"concept": concept, "class_word": "dog", "source": f"data/concepts/{concept}/{i:02d}.jpg",
                         "image": f"{concept}/{i:02d}.png", "mask": f"{concept}/{i:02d}_mask.png",
                         "cutout": f"{concept}/{i:02d}_cutout.png", "width": 128, "height": 128,
                         "area_fraction": float(mask.mean()), "bbox": [26, 26, 103, 116], "backend": "grabcut",
                         "quality": "ok"})
    pd.DataFrame(rows).to_parquet(dest / "manifest.parquet")
    return dest


def fusion(dest: Path, n: int = 6) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        left, right = _photo("dog", i % 3), _photo("dog3", i % 3)
        image = np.concatenate([left[:, 32:96], right[:, 32:96]], axis=1)  # (128, 128, 3): two subjects
        masks = [_ellipse(128, 0.25, 0.5, 0.2, 0.3), _ellipse(128, 0.75, 0.5, 0.2, 0.3)]
        kind = "fusion" if i % 2 == 0 else "reference"
        concepts = ["dog", "dog3"] if kind == "fusion" else ["dog"]
        rows.append({"id": f"row{i}", "kind": kind, "image": encode_png(image), "width": 128, "height": 128,
                     "prompt": "a <far-dog> dog and a <far-dog3> dog" if kind == "fusion" else "a <far-dog> dog",
                     "concepts": concepts, "class_words": ["dog"] * len(concepts),
                     "masks": [encode_png(m.astype(bool)) for m in masks[: len(concepts)]], "sources": [],
                     "augment": {"flip": False}, "seed": i})
    write_training_set(rows, dest / "train.parquet")
    return dest


def dvclive(dest: Path, steps: int = 40) -> Path:
    """dvclive's layout: plots/metrics/<name>.tsv with `timestamp step <name>` columns, metrics.json."""
    plots = dest / "plots" / "metrics" / "train"
    plots.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    last = {}
    for name, scale in (("loss", 1.0), ("refine_loss", 0.2)):
        values = scale * np.exp(-np.arange(steps) / 15) + 0.02 * rng.random(steps)
        df = pd.DataFrame({"timestamp": 1_700_000_000_000 + np.arange(steps), "step": np.arange(steps), name: values})
        df.to_csv(plots / f"{name}.tsv", sep="\t", index=False)
        last[name] = float(values[-1])
    (dest / "metrics.json").write_text(json.dumps({"train": last, "step": steps - 1}))
    return dest


def metrics(path: Path) -> Path:
    """reports/metrics.json as far.metrics writes it: numbers (or null) only."""
    data = {
        "overall": {"clip_t": 0.2512, "clipscore": 25.12, "clip_i": 0.7731, "dino": 0.5123},
        "per_concept": {"dog": {"clip_t": 0.25, "clip_i": 0.78, "dino": 0.52},
                        "dog3": {"clip_t": 0.26, "clip_i": 0.76, "dino": 0.50}},
        "multi_concept": {"identity_accuracy": 0.75, "identity_mixing": 0.31, "identity_margin": None,
                          "leakage": {"dog->dog3": 0.22, "dog3->dog": 0.19}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def eval_dir(dest: Path, tiny: bool = True) -> Path:
    """reports/eval as the evaluate stage writes it: backbones.json (the names) and a per-prompt table."""
    clip = "tiny-clip (seed 0; random init, offline)" if tiny else "clip ViT-B/32"
    dino = "tiny-dino-vit (seed 0; random init, offline)" if tiny else "dino facebook/dino-vits16"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "backbones.json").write_text(json.dumps({
        "clip": clip, "dino": dino, "clip_sha256": "ab12" * 16, "dino_sha256": "cd34" * 16,
        "subject_finder": "segment grabcut", "identity": "dino crops of found subjects (padding 0.1)"}))
    (dest / "per_prompt.csv").write_text("prompt_idx,prompt,clip_t\n0,a dog,0.25\n1,two dogs,0.3\n")
    return dest


def samples(dest: Path, seeds: tuple[int, ...] = (0, 1), side: int = 8) -> Path:
    """The sample stage's layout with real photos as 'samples' and Gaussian-blob attention maps."""
    (dest / "attn").mkdir(parents=True, exist_ok=True)
    prompts = [("a <far-dog> dog in the snow", ["dog"], "single"),
               ("a <far-dog> dog and a <far-dog3> dog playing in the park", ["dog", "dog3"], "multi")]
    rows = []
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    for idx, (prompt, concepts, kind) in enumerate(prompts):
        for seed in seeds:
            stem = f"{idx:03d}_{seed}"
            Image.fromarray(_photo(concepts[-1], seed, 256)).save(dest / f"{stem}.png")
            attention = []
            for j, c in enumerate(concepts):
                cx = 0.25 + 0.5 * j
                m = np.exp(-((xx - cx) ** 2 + (yy - 0.5) ** 2) / 0.05)
                np.save(dest / "attn" / f"{stem}_{c}.npy", (m / m.max()).astype(np.float16))
                attention.append(f"attn/{stem}_{c}.npy")
            rows.append({"prompt_idx": idx, "prompt": prompt, "template": "", "kind": kind, "concepts": concepts,
                         "class_words": ["dog"] * len(concepts), "tokens": [CONCEPTS[c] for c in concepts],
                         "seed": seed, "path": f"{stem}.png", "attention": attention, "width": 256, "height": 256})
    pd.DataFrame(rows).to_parquet(dest / "manifest.parquet")
    (dest / "sample.json").write_text(json.dumps({
        "images": len(rows), "scheduler": "DDIMScheduler", "attention_side": side, "base_model": "tiny (tiny)",
        "params": {"num_inference_steps": 20, "guidance_scale": 6.0}}))
    return dest


# What the world oracle "reads" in the fixture samples (bbox in sample pixels, x1/y1 exclusive): per prompt index,
# (class, body, part, pattern, bbox). Prompt 0 names dog: dog red/blue spots is it; prompt 1 names dog and dog3:
# the third dog takes its body from dog and its part and pattern from dog3, a mix of the two.
WORLD_TRUTHS = {"dog": ("dog", "red", "blue", "spots"), "dog3": ("dog", "yellow", "purple", "stripes")}
WORLD_READINGS = {
    0: [("dog", "red", "blue", "spots", (40, 60, 160, 200)),
        ("car", "yellow", "purple", "plain", (180, 190, 240, 240))],
    1: [("dog", "red", "blue", "spots", (10, 80, 110, 220)),
        ("dog", "yellow", "purple", "stripes", (140, 70, 250, 210)),
        ("dog", "red", "purple", "stripes", (100, 10, 160, 60))],
}


def world(eval_dir: Path, samples_dir: Path) -> Path:
    """`<eval_dir>/world.csv` as the evaluate stage writes it (far/world/verdict.py image_rows, to_csv as
    far.metrics does), for the samples of `samples` with WORLD_READINGS as the oracle's readings."""
    from far.metrics import Sample
    from far.world.concepts import WorldDog
    from far.world.oracle import Reading, SubjectReading
    from far.world.verdict import image_rows

    truths = {n: WorldDog(n, *attrs, backgrounds=("grass",), seed=0) for n, attrs in WORLD_TRUTHS.items()}
    items, readings = [], []
    for row in pd.read_parquet(samples_dir / "manifest.parquet").to_dict("records"):
        items.append(Sample(row["prompt_idx"], row["prompt"], row["kind"], tuple(row["concepts"]), row["seed"],
                            samples_dir / row["path"], ()))
        subjects = []
        for cls, body, part, pattern, (x0, y0, x1, y1) in WORLD_READINGS[row["prompt_idx"]]:
            mask = np.zeros((row["height"], row["width"]), bool)
            mask[y0:y1, x0:x1] = True
            subjects.append(SubjectReading(cls, body, part, pattern, mask, confidence=0.81234))
        readings.append(Reading("grass", tuple(subjects)))
    eval_dir.mkdir(parents=True, exist_ok=True)
    image_rows(items, readings, truths).to_csv(eval_dir / "world.csv", index=False, float_format="%.6g")
    return eval_dir / "world.csv"


def all_inputs(root: Path) -> dict[str, Path]:
    """Every report input under `root`, laid out as in the project (data/..., reports/..., dvclive/)."""
    return {
        "segmented": segmented(root / "data/segmented"),
        "fusion": fusion(root / "data/fusion"),
        "samples": samples(root / "data/samples"),
        "metrics": metrics(root / "reports/metrics.json"),
        "live": dvclive(root / "dvclive"),
        "eval": eval_dir(root / "reports/eval"),
    }
