"""The world's verdict: what the oracle reads in every sample, judged against the world concepts' truth.

The oracle (far/world/oracle.py) sees only pixels; the truth of each concept is its folder's world.json
(far/world/concepts.py); the prompt's kind, concepts and asked background come from the sample manifest. Per
image, each figure is 1, 0 or empty (not applicable); `summarize` averages them into the `world` block of
reports/metrics.json, each figure `f` beside `f_n`, the number of images it was computed on.

A subject *is* a concept when its class and all three attributes (body, part, pattern) are the concept's.

- single (one concept, "a <a> dog on the beach"):
  `identity`: some subject is the concept. `likeness`: the graded identity, the share of the concept's four
  properties (class, body, part, pattern) that its best-matching subject has (0 with no subject; a random
  subject of this vocabulary shares about a quarter). `background`: the oracle's background is the asked one.
  `background_unseen`: the same, only where the asked background is none of the concept's reference
  backgrounds. `memorised`: an unseen background was asked and one of the concept's reference backgrounds
  came instead.
- multi (two concepts, "a <a> dog and a <b> dog on the grass"):
  `both`: each concept is some subject. `likeness`: the mean of the two concepts' likeness. `leakage`: some
  subject of the concepts' class is neither concept but takes every attribute from one of them (so some from
  each: a mix of the two). `duplicate`: one concept is two or more subjects. `background` as above.
  `subjects_per_image`: subjects the oracle found.
- class (no concept, "a dog", "a dog in the snow"):
  `drift`: some subject is one of the concepts (the prior has moved toward ours; a uniformly random dog is one
  of two given dogs with probability 2/90 in this vocabulary). `class_found`: some subject has a concept's
  class. `background` as above.
- per_concept: `identity`, `background_unseen`, `memorised` (its single prompts) and `multi_found` (it is some
  subject in the multi prompts that name it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from far.errors import InvalidInputError
from far.world.concepts import WorldDog
from far.world.oracle import Oracle, Reading, SubjectReading

FIGURES = {
    "single": ("identity", "likeness", "background", "background_unseen", "memorised"),
    "multi": ("both", "likeness", "leakage", "duplicate", "background", "subjects_per_image"),
    "class": ("drift", "class_found", "background"),
}
PER_CONCEPT = ("identity", "background_unseen", "memorised", "multi_found")
COLUMNS = tuple(dict.fromkeys(f for figs in FIGURES.values() for f in figs)) + ("multi_found",)


def load_oracle(name: str) -> Oracle:
    """`eval.oracle`: `world` (the shipped weights, hash-checked against MANIFEST.json) or a safetensors path."""
    from far.world.paths import ORACLE
    from far.world.weights import verified_path

    path = verified_path(ORACLE.name) if name == "world" else Path(name)
    if not path.is_file():
        raise InvalidInputError(f"eval.oracle: {path} does not exist (the world oracle's weights; "
                                "`far world oracle` trains one)")
    oracle = Oracle.load(path)
    oracle.label = f"{oracle.label} ({path.name})"  # Oracle.load names the file's sha256
    return oracle


def is_concept(s: SubjectReading, dog: WorldDog) -> bool:
    return s.cls == dog.cls and s.attributes == dog.attributes


def likeness(subjects: Sequence[SubjectReading], dog: WorldDog) -> float:
    """The best subject's share of the dog's four properties (class and the three attributes); 0 without one."""
    def share(s: SubjectReading) -> float:
        return (float(s.cls == dog.cls) + sum(x == y for x, y in zip(s.attributes, dog.attributes, strict=True))) / 4

    return max(map(share, subjects), default=0.0)


def is_mix(s: SubjectReading, a: WorldDog, b: WorldDog) -> bool:
    """A subject of the pair's class that is neither dog, every attribute taken from one of the two."""
    if s.cls not in (a.cls, b.cls) or is_concept(s, a) or is_concept(s, b):
        return False
    return all(x in (y, z) for x, y, z in zip(s.attributes, a.attributes, b.attributes, strict=True))


def label(s: SubjectReading, truths: dict[str, WorldDog], pair: Sequence[WorldDog] = ()) -> str:
    """What a subject is: a concept's name, `mix:<a>+<b>` (a leaked mix of the prompt's pair) or ''."""
    for name, dog in truths.items():
        if is_concept(s, dog):
            return name
    if len(pair) == 2 and is_mix(s, *pair):
        return f"mix:{pair[0].name}+{pair[1].name}"
    return ""


def judge(kind: str, concepts: Sequence[str], asked: str | None, reading: Reading,
          truths: dict[str, WorldDog]) -> dict[str, float]:
    """One image's figures (1.0 / 0.0; absent where not applicable), see the module docstring."""
    subjects = reading.subjects
    out: dict[str, float] = {}
    if asked is not None:
        out["background"] = float(reading.background == asked)
    if kind == "single":
        dog = truths[concepts[0]]
        out["identity"] = float(any(is_concept(s, dog) for s in subjects))
        out["likeness"] = likeness(subjects, dog)
        if asked is not None and asked not in dog.backgrounds:
            out["background_unseen"] = out["background"]
            out["memorised"] = float(reading.background in dog.backgrounds)
    elif kind == "multi":
        if len(concepts) != 2:
            raise InvalidInputError(f"the world verdict judges two-concept prompts, got concepts {list(concepts)}")
        a, b = truths[concepts[0]], truths[concepts[1]]
        counts = [sum(is_concept(s, d) for s in subjects) for d in (a, b)]
        out["both"] = float(min(counts) >= 1)
        out["likeness"] = (likeness(subjects, a) + likeness(subjects, b)) / 2
        out["leakage"] = float(any(is_mix(s, a, b) for s in subjects))
        out["duplicate"] = float(max(counts) >= 2)
        out["subjects_per_image"] = float(len(subjects))
    elif kind == "class":
        out["drift"] = float(any(is_concept(s, d) for s in subjects for d in truths.values()))
        out["class_found"] = float(any(s.cls in {d.cls for d in truths.values()} for s in subjects))
    else:
        raise InvalidInputError(f"the world verdict knows kinds single, multi and class, got {kind!r}")
    return out


def found_per_concept(kind: str, concepts: Sequence[str], reading: Reading,
                      truths: dict[str, WorldDog]) -> dict[str, float]:
    """{concept: 1.0 if it is some subject} for the concepts a multi prompt names (per_concept.multi_found)."""
    if kind != "multi":
        return {}
    return {c: float(any(is_concept(s, truths[c]) for s in reading.subjects)) for c in concepts}


def image_rows(samples: Sequence[Any], readings: Sequence[Reading], truths: dict[str, WorldDog]) -> pd.DataFrame:
    """reports/eval/world.csv: one row per image with its reading (subjects as JSON with bbox, attributes,
    confidence and what each one is) and its figures. `samples`: far.metrics.Sample, in manifest order."""
    rows = []
    for s, r in zip(samples, readings, strict=True):
        pair = [truths[c] for c in s.concepts] if s.kind == "multi" else []
        found = found_per_concept(s.kind, s.concepts, r, truths)
        subjects = [x.to_dict() | {"is": label(x, truths, pair)} for x in r.subjects]
        rows.append({
            "prompt_idx": s.prompt_idx, "seed": s.seed, "kind": s.kind, "concepts": "+".join(s.concepts),
            "prompt": s.prompt, "path": s.path.name, "asked_background": s.background,
            "unseen_background": (s.background is not None and s.kind == "single"
                                  and s.background not in truths[s.concepts[0]].backgrounds),
            "oracle_background": r.background, "n_subjects": len(r.subjects), "subjects": json.dumps(subjects),
            "multi_found": json.dumps(found) if found else "",
        } | dict.fromkeys(COLUMNS[:-1], np.nan) | judge(s.kind, s.concepts, s.background, r, truths))
    return pd.DataFrame(rows)


def prompt_rows(images: pd.DataFrame) -> pd.DataFrame:
    """reports/eval/world_prompts.csv: each figure's mean over a prompt's seeds, and the images it had."""
    figures = [c for c in COLUMNS[:-1] if c in images]
    keys = ["prompt_idx", "kind", "concepts", "prompt", "asked_background"]
    df = images.assign(asked_background=images.asked_background.fillna(""))
    return (df.groupby(keys, sort=True)
            .agg(**{f: (f, "mean") for f in figures}, n_images=("seed", "size")).reset_index())


def _figure(values: pd.Series) -> tuple[float | None, int]:
    v = values.dropna()
    return (float(v.mean()) if len(v) else None), int(len(v))


def summarize(images: pd.DataFrame, truths: dict[str, WorldDog]) -> dict[str, Any]:
    """The `world` block of metrics.json: per kind, each figure `f` and `f_n`; per concept; numbers only."""
    out: dict[str, Any] = {"n_images": len(images)}
    for kind, figures in FIGURES.items():
        part = images[images.kind == kind]
        block: dict[str, Any] = {"n_images": len(part)}
        for f in figures:
            block[f], block[f"{f}_n"] = _figure(part[f]) if f in part else (None, 0)
        out[kind] = block
    per_concept = {}
    for name in truths:
        single = images[(images.kind == "single") & (images.concepts == name)]
        block = {}
        for f in PER_CONCEPT[:-1]:
            block[f], block[f"{f}_n"] = _figure(single[f]) if f in single else (None, 0)
        multi = images[(images.kind == "multi") & images.concepts.str.split("+").apply(lambda c, n=name: n in c)]
        found = pd.Series([json.loads(v)[name] for v in multi.multi_found], dtype=float)
        block["multi_found"], block["multi_found_n"] = _figure(found)
        per_concept[name] = block
    out["per_concept"] = per_concept
    return out


def verdict(samples: Sequence[Any], oracle: Oracle, truths: dict[str, WorldDog],
            open_image: Any) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Read every sample with the oracle and judge it -> (world block, world.csv rows, world_prompts.csv rows).

    `open_image(path) -> PIL.Image` (far.metrics.open_rgb, cached there).
    """
    readings = oracle.read([np.asarray(open_image(s.path)) for s in samples])
    images = image_rows(samples, readings, truths)
    return summarize(images, truths), images, prompt_rows(images)
