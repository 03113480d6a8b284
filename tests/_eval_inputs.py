"""Evaluate-stage inputs built from the real concept photos, following the segment and sample contracts.

Until real samples exist, the shipped photos stand in for "generated" images: single-concept samples are
the photos themselves; multi-concept samples are composites of the two concepts' own reference cut-outs (the
segmented subject of `dog` reference `seed % 2` in the left half, of `dog3` in the right half, on a plain grey
background), with attention maps we construct: a blob over each subject, or swapped / identical / uniform /
empty (dog3's map zero) on request.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = {"dog": ("<far-dog>", "dog"), "dog3": ("<far-dog3>", "dog")}
SIDE = 256
MAP = 16  # attention map side
GREY = (128, 128, 128)  # composite background
MAPS = ("right", "swapped", "identical", "uniform", "empty")


def photo(concept: str, i: int) -> Image.Image:
    with Image.open(ROOT / "data" / "concepts" / concept / f"{i:02d}.jpg") as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def subject_box(im: Image.Image) -> list[int]:
    """The test references' subject: the centre 60% box (x0, y0, x1, y1; exclusive end)."""
    w, h = im.size
    return [int(0.2 * w), int(0.2 * h), int(0.8 * w), int(0.8 * h)]


def make_segmented(out: Path, n: int = 3) -> Path:
    """`data/segmented`-shaped directory: images, masks, cutouts and manifest (mask = centre 60% box)."""
    rows = []
    for concept, (_, cw) in CONCEPTS.items():
        (out / concept).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im = photo(concept, i)
            w, h = im.size
            bbox = subject_box(im)
            mask = Image.new("L", (w, h), 0)
            mask.paste(255, bbox)
            stem = f"{i:02d}"
            im.save(out / concept / f"{stem}.png")
            mask.save(out / concept / f"{stem}_mask.png")
            cut = im.copy()
            cut.putalpha(mask)
            cut.save(out / concept / f"{stem}_cutout.png")
            rows.append({"concept": concept, "class_word": cw, "source": f"data/concepts/{concept}/{stem}.jpg",
                         "image": f"{concept}/{stem}.png", "mask": f"{concept}/{stem}_mask.png",
                         "cutout": f"{concept}/{stem}_cutout.png", "width": w, "height": h,
                         "area_fraction": 0.36, "bbox": bbox, "backend": "test-box", "quality": "ok"})
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    return out


def blob(cx: float, cy: float, sigma: float = 2.5) -> np.ndarray:
    """(MAP, MAP) Gaussian blob centred at (cx, cy) in cell-index coordinates (cell i's centre is i)."""
    y, x = np.mgrid[0:MAP, 0:MAP]
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)).astype(np.float32)


def composite(i: int) -> Image.Image:
    """SIDE x SIDE: reference i's cut-out of `dog` centred in the left half, of `dog3` in the right, on grey."""
    im = Image.new("RGB", (SIDE, SIDE), GREY)
    for k, concept in enumerate(CONCEPTS):
        ref = photo(concept, i)
        cut = ImageOps.contain(ref.crop(tuple(subject_box(ref))), (SIDE // 2 - 32, SIDE - 64))
        im.paste(cut, (k * SIDE // 2 + (SIDE // 2 - cut.width) // 2, (SIDE - cut.height) // 2))
    return im


def make_samples(out: Path, seeds: tuple[int, ...] = (0, 1), maps: str = "right") -> Path:
    """`data/samples`-shaped directory; `maps` (one of MAPS) sets the multi-concept samples' attention maps."""
    (out / "attn").mkdir(parents=True, exist_ok=True)
    rows = []
    prompts = [("single", ["dog"], "a <far-dog> dog on the beach"),
               ("single", ["dog3"], "a <far-dog3> dog in the jungle"),
               ("multi", ["dog", "dog3"], "a <far-dog> dog and a <far-dog3> dog in the snow")]
    c = MAP / 2 - 0.5  # cell i covers pixels [i, i + 1) * SIDE / MAP: the image centre is at cell 7.5
    left, right = blob(MAP * 0.25 - 0.5, c), blob(MAP * 0.75 - 0.5, c)
    for idx, (kind, names, prompt) in enumerate(prompts):
        for seed in seeds:
            stem = f"{idx:03d}_{seed}"
            if kind == "single":
                im = ImageOps.fit(photo(names[0], 3 + seed % 2), (SIDE, SIDE))
                attn = {names[0]: blob(c, c, 4.0)}
            else:
                im = composite(seed % 2)
                uniform = np.ones((MAP, MAP), np.float32)
                attn = {"right": {"dog": left, "dog3": right}, "swapped": {"dog": right, "dog3": left},
                        "identical": {"dog": left, "dog3": left.copy()}, "uniform": {"dog": uniform, "dog3": uniform},
                        "empty": {"dog": left, "dog3": np.zeros_like(right)}}[maps]
            im.save(out / f"{stem}.png")
            for name, m in attn.items():
                np.save(out / "attn" / f"{stem}_{name}.npy", m)
            rows.append({"prompt_idx": idx, "prompt": prompt, "template": prompt, "kind": kind, "concepts": names,
                         "class_words": [CONCEPTS[n][1] for n in names], "tokens": [CONCEPTS[n][0] for n in names],
                         "seed": seed, "path": f"{stem}.png", "attention": [f"attn/{stem}_{n}.npy" for n in names],
                         "width": SIDE, "height": SIDE})
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    return out
