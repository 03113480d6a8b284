"""CLIP-T, CLIP-I and DINO as the personalization literature computes them, plus their batched evaluation.

- **CLIP-T** (DreamBooth's prompt fidelity): cosine between the CLIP text embedding of the prompt and the
  CLIP image embedding of the generated image, raw (in [-1, 1]), averaged over images. **CLIPScore** (Hessel
  et al., torchmetrics' `CLIPScore`) is the same cosine as 100 * max(cos, 0), averaged per image; reported
  under its own name, never mixed with CLIP-T.
- **CLIP-I** / **DINO** (subject fidelity): mean pairwise cosine between the embeddings of a generated image
  and of every reference image of the concept, averaged over generated images. DINO is a ViT-S/16 CLS token
  with the DreamBooth / Custom Diffusion preprocessing (far.backbones.dino_preprocess); CLIP uses the
  model's own preprocessing (resize shortest side to 224 bicubic, centre crop, CLIP mean/std).
- For an image of several concepts, CLIP-I / DINO are computed against each of its concepts' references and
  averaged over those concepts (as Custom Diffusion does); the multi-concept identity metrics (subjects found
  from pixels by far/subjects.py) and the attention diagnostics (`attn_*`) are defined in far.identity.

In the world (every concept folder has a world.json, or `eval.world: true`), the oracle reads every sample and
far/world/verdict.py judges it against the truth: the `world` block of metrics.json, `world.csv` (per image, with
the oracle's readings) and `world_prompts.csv` (per prompt). Class prompts ("a dog", no concept) have no CLIP-I
or DINO (no references): their cells are empty.

`reports/metrics.json` holds numbers only (DVC metrics); the names and hashes of the backbones, the subject
finder and the oracle go to `backbones.json` beside the tables.

The text for CLIP-T is the prompt with each identifier token removed where the class word follows it
("a <far-dog> dog on the beach" -> "a dog on the beach", DreamBooth's and Custom Diffusion's practice: the
token means nothing to CLIP), or replaced by the class word where it stands alone. References are the images
in `data/segmented` (as loaded: EXIF applied, RGB); each is embedded once per run and reused for every image.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from far.config import ConceptsConfig, EvalConfig, SegmentConfig
from far.dataset import open_stage_parquet
from far.errors import InvalidInputError

MANIFEST = "manifest.parquet"
SAMPLE_COLUMNS = ("prompt", "kind", "concepts", "seed", "path")
REFERENCE_COLUMNS = ("concept", "image", "bbox")
PER_IMAGE_SCORES = (
    "clip_t", "clipscore", "clip_i", "dino", "identity_accuracy", "identity_mixing", "attn_identity_accuracy",
    "attn_leakage",
)


# ------------------------------------------------------------------------------------------- formulas
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities (inputs need not be normalised)."""
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def clip_t(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N,) raw cosine of each image with its own prompt (DreamBooth's CLIP-T)."""
    return (torch.nn.functional.normalize(image_emb, dim=-1) * torch.nn.functional.normalize(text_emb, dim=-1)).sum(-1)


def clipscore(cos: torch.Tensor) -> torch.Tensor:
    """CLIPScore form of a cosine: 100 * max(cos, 0) (Hessel et al. 2021 with w = 100, as torchmetrics)."""
    return 100 * cos.clamp(min=0)


def mean_pairwise(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N,) mean cosine of each generated embedding to all M references (CLIP-I, DINO)."""
    return cosine(generated, references).mean(dim=1)


def clip_prompt(prompt: str, tokens: list[tuple[str, str]]) -> str:
    """The prompt CLIP-T scores: each (token, class word) token dropped before its class word, else replaced."""
    for token, class_word in tokens:
        prompt = re.sub(rf"{re.escape(token)}(\s+{re.escape(class_word)}\b)?", class_word, prompt)
    return " ".join(prompt.split())


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Sample:
    """One generated image from `data/samples/manifest.parquet` (paths resolved against the samples dir)."""

    prompt_idx: int
    prompt: str
    kind: str  # single | multi | class (no concept: the plain class word)
    concepts: tuple[str, ...]
    seed: int
    path: Path
    attention: tuple[Path, ...]  # one (S, S) .npy per concept, same order; empty if the sampler kept none
    background: str | None = None  # the world background the prompt asks for (sample.prompt_set: world)


def read_samples(samples: Path, concepts: ConceptsConfig) -> list[Sample]:
    """Validate and read the sample manifest; every image and attention file must exist."""
    manifest = Path(samples) / MANIFEST
    df = open_stage_parquet(manifest, SAMPLE_COLUMNS, "sample manifest", "sample").read().to_pandas()
    if df.empty:
        raise InvalidInputError(f"{manifest}: no samples")
    known = {c.name for c in concepts.subjects}
    out = []
    for i, row in enumerate(df.to_dict("records")):
        names = tuple(row["concepts"])
        where = f"{manifest} row {i}"
        if set(names) - known:
            raise InvalidInputError(f"{where}: concepts {list(names)} must be in {sorted(known)}")
        if {"single": len(names) == 1, "multi": len(names) >= 2, "class": not names}.get(row["kind"]) is not True:
            raise InvalidInputError(f"{where}: kind {row['kind']!r} does not fit {len(names)} concept(s)")
        attention = tuple(Path(samples) / p for p in (row.get("attention") if row.get("attention") is not None else []))
        if attention and len(attention) != len(names):
            raise InvalidInputError(f"{where}: {len(attention)} attention maps for {len(names)} concepts")
        path = Path(samples) / row["path"]
        for f in (path, *attention):
            if not f.is_file():
                raise InvalidInputError(f"{where}: file {f} does not exist")
        out.append(Sample(int(row.get("prompt_idx", i)), row["prompt"], row["kind"], names, int(row["seed"]), path,
                          attention, row["background"] if isinstance(row.get("background"), str) else None))
    return out


@dataclass(frozen=True)
class Reference:
    """One reference image of a concept and its subject's bbox (x0, y0, x1, y1; exclusive end)."""

    concept: str
    path: Path
    bbox: tuple[int, int, int, int]


def read_references(segmented: Path, concepts: ConceptsConfig) -> dict[str, list[Reference]]:
    """Reference images per concept from the segment stage's manifest; every concept must have one."""
    manifest = Path(segmented) / MANIFEST
    df = open_stage_parquet(manifest, REFERENCE_COLUMNS, "segmentation manifest", "segment").read().to_pandas()
    refs: dict[str, list[Reference]] = {c.name: [] for c in concepts.subjects}
    for row in df.to_dict("records"):
        if row["concept"] in refs:
            path = Path(segmented) / row["image"]
            if not path.is_file():
                raise InvalidInputError(f"{manifest}: reference image {path} does not exist")
            refs[row["concept"]].append(Reference(row["concept"], path, tuple(int(v) for v in row["bbox"])))
    empty = [c for c, r in refs.items() if not r]
    if empty:
        raise InvalidInputError(f"{manifest}: no reference images for concepts {empty}")
    return refs


# ------------------------------------------------------------------------------------------- embeddings
class EmbeddingCache:
    """Embeddings by key, computed in batches only for keys not seen yet (references are embedded once)."""

    def __init__(self, embed: Callable[[list[Image.Image]], torch.Tensor]):
        self._embed = embed
        self._store: dict[Hashable, torch.Tensor] = {}
        self.computed = 0  # how many embeddings were actually computed (for tests and the run summary)

    def get(self, keys: list[Hashable], load: Callable[[Hashable], Image.Image]) -> torch.Tensor:
        """(len(keys), D) embeddings; `load(key)` gives the PIL image of a key not cached yet."""
        todo = list(dict.fromkeys(k for k in keys if k not in self._store))
        if todo:
            for key, emb in zip(todo, self._embed([load(k) for k in todo]), strict=True):
                self._store[key] = emb
            self.computed += len(todo)
        return torch.stack([self._store[k] for k in keys])


def open_rgb(path: Path) -> Image.Image:
    """An image as RGB, with a clear error for an unreadable file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise InvalidInputError(f"{path}: not a readable image: {exc}") from None


# ------------------------------------------------------------------------------------------- aggregation
def finite_mean(values: Any) -> float | None:
    """Mean of the finite values, None when there are none (JSON has no NaN)."""
    arr = np.asarray(list(values), dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def _clean(obj: Any) -> Any:
    """Round floats to 6 decimals and turn NaN/inf into None, recursively (stable, valid JSON)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return round(float(obj), 6) if math.isfinite(obj) else None
    return obj


def _identity_block(identity: pd.DataFrame, prefix: str) -> dict[str, Any]:
    return {f"{prefix}identity_accuracy": float(identity.correct.mean()),
            f"{prefix}identity_mixing": finite_mean(identity.mixing),
            f"{prefix}identity_margin": finite_mean(identity.margin)}


def summarize(per_image: pd.DataFrame, identity: pd.DataFrame, attn_identity: pd.DataFrame,
              leak: pd.DataFrame) -> dict[str, Any]:
    """metrics.json {overall, per_concept, multi_concept}, numbers only, from the per-image tables."""
    head = ("clip_t", "clipscore", "clip_i", "dino")

    def block(df: pd.DataFrame) -> dict[str, Any]:
        return {m: finite_mean(df[m]) for m in head} | {"n_images": len(df)}

    single = per_image[per_image.kind == "single"]
    multi = per_image[per_image.kind == "multi"]
    per_concept = {c: block(g) for c, g in single.groupby("concepts", sort=True)}
    multi_block: dict[str, Any] = block(multi)
    if len(identity):
        multi_block |= _identity_block(identity, "") | {
            "subjects_found": float(identity.found.mean()),  # share of (image, concept) given an instance
            "subjects_per_image": float(identity.groupby("path").n_subjects.first().mean()),
        }
    if len(attn_identity):
        multi_block |= _identity_block(attn_identity, "attn_")
        multi_block["attn_regions_found"] = float(attn_identity.found.mean())
    if len(leak):
        multi_block["attn_leakage"] = finite_mean(leak.overlap)
        multi_block["attn_leakage_pairs"] = {f"{a}+{b}": finite_mean(g.overlap) for (a, b), g in
                                             leak.groupby(["concept_a", "concept_b"], sort=True)}
    return _clean({"overall": block(per_image), "per_concept": per_concept, "multi_concept": multi_block})


def check_numbers_only(obj: Any, where: str = "metrics") -> None:
    """Raise when a metrics.json value is not a number (or null): DVC metrics are numbers; names go elsewhere."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_numbers_only(v, f"{where}.{k}")
    elif obj is not None and (isinstance(obj, bool) or not isinstance(obj, int | float)):
        raise ValueError(f"{where} = {obj!r}: metrics.json holds numbers only (names belong in backbones.json)")


# ------------------------------------------------------------------------------------------- the metric pass
def _mean_or_nan(scores: list[Any]) -> float:
    """Mean of a sample's per-concept scores; NaN for a class prompt (no concept: no references)."""
    return float(np.mean([float(x) for x in scores])) if scores else math.nan


def world_inputs(cfg: EvalConfig, concepts: ConceptsConfig) -> tuple[dict[str, Any], Any]:
    """(world truths by concept, oracle) for `eval.world` / `eval.subject_finder: oracle`; ({}, None) when unused.

    `eval.world: auto` judges the world verdict when every concept folder has a world.json, `true` requires it.
    """
    from far.world.concepts import world_truths

    truths = {} if cfg.world is False else world_truths(concepts.subjects, required=cfg.world is True)
    if not truths and cfg.subject_finder != "oracle":
        return {}, None
    from far.world.verdict import load_oracle

    return truths, load_oracle(cfg.oracle)


def _verdict(v: Any) -> dict[str, Any]:
    """An identity table row's verdict columns from a far.identity.Identity."""
    return {"found": v.found, "bbox": list(v.bbox) if v.bbox else None,
            **{f"sim_{n}": x for n, x in v.similarity.items()}, "correct": v.correct, "mixing": v.mixing,
            "margin": v.margin}


@dataclass
class _Crops:
    """Identity crops of all multi-concept images, embedded in one batched pass at the end."""

    keys: list[tuple[Path, tuple[int, ...] | str]]  # (image path, pixel bbox or "whole")
    owners: list[tuple[int, Any]]  # (sample index, instance index or concept name)

    def add(self, path: Path, bbox: tuple[int, ...] | None, owner: tuple[int, Any]) -> None:
        self.keys.append((path, bbox or "whole"))
        self.owners.append(owner)


@dataclass
class _Scorers:
    """What scores the samples: the CLIP and DINO backbones, the subject finder (multi-concept prompts), the
    segmenter (`eval.regions: segment`), the oracle and the world truths (the world verdict)."""

    clip: Any
    dino: Any
    finder: Any
    segmenter: Any
    oracle: Any
    truths: dict[str, Any]


def _load_scorers(items: list[Sample], cfg: EvalConfig, concepts: ConceptsConfig, segment: SegmentConfig,
                  workdir: Path, backbones: tuple[Any, Any] | None, finder: Any) -> _Scorers:
    """Load what `items` need and is not given: backbones from `cfg`, the finder only for multi-concept samples."""
    from far.backbones import load_clip, load_dino, pick_device
    from far.subjects import make_finder

    segmenter = None
    if cfg.regions == "segment" and any(s.attention and s.kind == "multi" for s in items):
        from far.segment import Segmenter

        segmenter = Segmenter(segment)
    if backbones is None:
        device = pick_device(cfg.device)
        backbones = (load_clip(cfg.clip_model, workdir, device, cfg.tiny_seed),
                     load_dino(cfg.dino_model, workdir, device, cfg.tiny_seed))
    clip_bb, dino_bb = backbones
    truths, oracle = world_inputs(cfg, concepts)
    if finder is None and any(s.kind == "multi" for s in items):
        finder = make_finder(cfg, segment, str(dino_bb.device), oracle)
    return _Scorers(clip_bb, dino_bb, finder, segmenter, oracle, truths)


@dataclass
class _ImageScores:
    """Per-image rows (CLIP-T, CLIP-I, DINO), attention-overlap rows, the subjects found in each multi-concept
    image (sample index -> far.subjects.Subject list) and the identity crops still to embed."""

    rows: list[dict[str, Any]]
    leak_rows: list[dict[str, Any]]
    found: dict[int, list[Any]]
    crops: _Crops


@dataclass
class _ReferenceEmbeddings:
    """Per concept (K, D): its references' CLIP and DINO embeddings, and DINO's of their subject crops."""

    clip: dict[str, torch.Tensor]
    dino: dict[str, torch.Tensor]
    dino_crops: dict[str, torch.Tensor]


def _embed_references(refs: dict[str, list[Reference]], clip_cache: EmbeddingCache, dino_cache: EmbeddingCache,
                      load: Callable[[Path], Image.Image]) -> _ReferenceEmbeddings:
    ref_paths = {c: [r.path for r in rs] for c, rs in refs.items()}
    ref_crops = {c: [(r.path, r.bbox) for r in rs] for c, rs in refs.items()}
    return _ReferenceEmbeddings(
        clip={c: clip_cache.get(p, load) for c, p in ref_paths.items()},
        dino={c: dino_cache.get(p, load) for c, p in ref_paths.items()},
        dino_crops={c: dino_cache.get(k, lambda k: load(k[0]).crop(k[1])) for c, k in ref_crops.items()},
    )


def _score_images(items: list[Sample], ref_emb: _ReferenceEmbeddings, concepts: ConceptsConfig, cfg: EvalConfig,
                  scorers: _Scorers, clip_cache: EmbeddingCache, dino_cache: EmbeddingCache,
                  load: Callable[[Path], Image.Image]) -> _ImageScores:
    """Embed every sample (each once), score CLIP-T/CLIP-I/DINO per image, find the subjects of multi-concept
    images from pixels, and collect their identity crops (found instances and attention regions)."""
    from far import identity as ident

    bs = cfg.batch_size
    clip_refs, dino_refs = ref_emb.clip, ref_emb.dino
    token_map = [(c.token, c.class_word) for c in concepts.subjects]
    class_word = {c.name: c.class_word for c in concepts.subjects}
    texts = [clip_prompt(s.prompt, token_map) for s in items]
    paths = [s.path for s in items]
    chunks = [paths[i : i + 2 * bs] for i in range(0, len(paths), 2 * bs)]  # CLIP then DINO while decoded
    clip_img, dino_img = map(torch.cat, zip(*[(clip_cache.get(c, load), dino_cache.get(c, load)) for c in chunks],
                                            strict=True))  # (N, D) each
    cos_t = clip_t(clip_img, scorers.clip.embed_texts(texts))  # (N,)

    out = _ImageScores([], [], {}, _Crops([], []))  # instance crops: owner (i, index); attention: (i, concept)
    for i, s in enumerate(items):
        out.rows.append({
            "prompt_idx": s.prompt_idx, "seed": s.seed, "kind": s.kind, "concepts": "+".join(s.concepts),
            "prompt": s.prompt, "clip_prompt": texts[i], "path": s.path.name,
            "clip_t": float(cos_t[i]), "clipscore": float(clipscore(cos_t[i])),
            "clip_i": _mean_or_nan([mean_pairwise(clip_img[i : i + 1], clip_refs[c])[0] for c in s.concepts]),
            "dino": _mean_or_nan([mean_pairwise(dino_img[i : i + 1], dino_refs[c])[0] for c in s.concepts])})
        if s.kind != "multi":
            continue
        image = load(s.path)
        size = image.size
        out.found[i] = scorers.finder(image, [class_word[c] for c in s.concepts])  # pixels only, never attention
        for j, subject in enumerate(out.found[i]):
            out.crops.add(s.path, ident.pad_box(subject.bbox, size, cfg.crop_padding), (i, j))
        if not s.attention:
            continue
        maps = {c: ident.load_map(p) for c, p in zip(s.concepts, s.attention, strict=True)}
        for (a, b), overlap in ident.leakage(maps).items():
            out.leak_rows.append({"path": s.path.name, "prompt_idx": s.prompt_idx, "seed": s.seed, "concept_a": a,
                                  "concept_b": b, "overlap": overlap})
        if scorers.segmenter is None:  # eval.regions: attention -> (S, S) regions
            regions = ident.attention_regions(maps, cfg.region_threshold)
        else:  # eval.regions: segment -> (H, W) regions: the foreground split by the largest map
            maps = {c: ident.upsample(m, size) for c, m in maps.items()}
            regions = ident.segment_regions(maps, scorers.segmenter(np.asarray(image), s.path))
        for c, m in maps.items():
            out.crops.add(s.path, ident.region_bbox(regions[c], m, size, cfg.crop_padding), (i, c))
    return out


def _judge_identities(items: list[Sample], ref_emb: _ReferenceEmbeddings, names: list[str], cfg: EvalConfig,
                      scores: _ImageScores, dino_cache: EmbeddingCache,
                      load: Callable[[Path], Image.Image]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The identity tables: each found subject (Hungarian-assigned to a concept) and each concept's attention
    region judged by DINO similarity of its crop to every concept's reference crops -> (identity, attn_identity)."""
    from far import identity as ident

    dino_ref_crops = ref_emb.dino_crops
    crops = scores.crops
    sims: dict[tuple[int, Any], dict[str, float]] = {}
    if crops.keys:  # all identity crops of all images in one batched pass
        embs = dino_cache.get(crops.keys, lambda k: load(k[0]) if k[1] == "whole" else load(k[0]).crop(k[1]))
        for owner, emb in zip(crops.owners, embs, strict=True):
            sims[owner] = {n: float(mean_pairwise(emb[None], dino_ref_crops[n])[0]) for n in names}
    id_rows, attn_rows = [], []
    for i, subjects in scores.found.items():
        s = items[i]
        where = {"path": s.path.name, "prompt_idx": s.prompt_idx, "seed": s.seed}
        size = load(s.path).size
        matrix = np.array([[sims[(i, j)][c] for c in s.concepts] for j in range(len(subjects))])
        for c, j in ident.assign(list(s.concepts), matrix.reshape(-1, len(s.concepts))).items():
            box = None if j is None else ident.pad_box(subjects[j].bbox, size, cfg.crop_padding)
            v = ident.judge(c, j is not None, box, sims[(i, j)] if j is not None else dict.fromkeys(names, math.nan))
            id_rows.append(where | {"concept": c, "instance": j, "n_subjects": len(subjects)} | _verdict(v))
        for c in (s.concepts if s.attention else ()):
            box = crops.keys[crops.owners.index((i, c))][1]
            v = ident.judge(c, box != "whole", None if box == "whole" else box, sims[(i, c)])
            attn_rows.append(where | {"concept": c} | _verdict(v))
    return pd.DataFrame(id_rows), pd.DataFrame(attn_rows)


def _per_image_table(rows: list[dict[str, Any]], identity: pd.DataFrame, attn_identity: pd.DataFrame,
                     leak: pd.DataFrame) -> pd.DataFrame:
    """One row per image: its scores, with its identity accuracy/mixing and mean attention overlap merged in."""
    per_image = pd.DataFrame(rows)
    for df, prefix in ((identity, ""), (attn_identity, "attn_")):
        if len(df):
            by_image = df.groupby("path").agg(**{f"{prefix}identity_accuracy": ("correct", "mean"),
                                                 f"{prefix}identity_mixing": ("mixing", "mean")})
            per_image = per_image.merge(by_image, how="left", left_on="path", right_index=True)
    if len(leak):
        per_image = per_image.merge(leak.groupby("path").overlap.mean().rename("attn_leakage"), how="left",
                                    left_on="path", right_index=True)
    return per_image


def _labels(scorers: _Scorers, cfg: EvalConfig) -> dict[str, Any]:
    """Names and hashes of what scored (backbones.json): numbers only go to metrics.json."""
    clip_bb, dino_bb, finder, segmenter, oracle = (scorers.clip, scorers.dino, scorers.finder, scorers.segmenter,
                                                   scorers.oracle)
    return {
        "clip": clip_bb.name, "dino": dino_bb.name, "clip_sha256": clip_bb.sha256, "dino_sha256": dino_bb.sha256,
        "subject_finder": finder.label if finder is not None else None,
        "oracle": oracle.label if oracle is not None else None,
        "identity": f"dino crops of found subjects (padding {cfg.crop_padding}), Hungarian assignment",
        "attn_identity": (f"dino crops of {cfg.regions} regions (" + (f"threshold {cfg.region_threshold}"
                          if segmenter is None else f"segment backend {segmenter.label}") +
                          f", padding {cfg.crop_padding}); a diagnostic: reads the trained attention maps"),
    }


def evaluate(samples: Path, segmented: Path, concepts: ConceptsConfig, cfg: EvalConfig, workdir: Path,
             backbones: tuple[Any, Any] | None = None, segment: SegmentConfig | None = None,
             finder: Any = None) -> tuple[dict[str, Any], dict[str, pd.DataFrame], dict[str, Any]]:
    """Score every sample -> (metrics.json content, tables by name, run summary incl. `backbones` names).

    Backbones load from `cfg` unless given, the subject finder (far.subjects.SubjectFinder) from
    `eval.subject_finder` unless given; `segment` (the `segment` params) serves the `segment` finder and
    `eval.regions: segment`.

    `workdir` receives the tiny backbones when they are built. Embeddings are computed in batches of
    `eval.batch_size`, each once (EmbeddingCache: a reference is embedded once however many samples use it),
    and a generated image is decoded once for both backbones. An attention region that is empty is
    compared as the whole image, for the attn_identity table only: it counts as misidentified.
    """
    items = read_samples(samples, concepts)
    refs = read_references(segmented, concepts)
    start = time.perf_counter()
    scorers = _load_scorers(items, cfg, concepts, segment or SegmentConfig(), workdir, backbones, finder)
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    bs = cfg.batch_size
    clip_cache = EmbeddingCache(lambda ims: scorers.clip.embed_images(ims, bs))
    dino_cache = EmbeddingCache(lambda ims: scorers.dino.embed_images(ims, bs))
    load = functools.lru_cache(maxsize=4 * bs)(open_rgb)  # each image is decoded once for both backbones
    ref_emb = _embed_references(refs, clip_cache, dino_cache, load)  # references first: batches (so floats) as before
    scores = _score_images(items, ref_emb, concepts, cfg, scorers, clip_cache, dino_cache, load)
    names = [c.name for c in concepts.subjects]
    identity, attn_identity = _judge_identities(items, ref_emb, names, cfg, scores, dino_cache, load)
    leak = pd.DataFrame(scores.leak_rows)
    per_image = _per_image_table(scores.rows, identity, attn_identity, leak)
    metric_seconds = time.perf_counter() - start

    metrics = summarize(per_image, identity, attn_identity, leak)
    tables_world: dict[str, pd.DataFrame] = {}
    if scorers.truths:  # the world verdict (far/world/verdict.py): the oracle's reading of every sample vs. truth
        from far.world.verdict import verdict

        metrics["world"], tables_world["world"], tables_world["world_prompts"] = verdict(
            items, scorers.oracle, scorers.truths, load)
        metrics = _clean(metrics)
    scored = [c for c in per_image.columns if c in PER_IMAGE_SCORES]
    per_prompt = (per_image.groupby(["prompt_idx", "kind", "concepts", "prompt"], sort=True)
                  .agg(**{m: (m, "mean") for m in scored}, n_images=("seed", "size")).reset_index())
    tables = {"per_image": per_image, "per_prompt": per_prompt, "identity": identity, "attn_identity": attn_identity,
              "attn_leakage": leak} | tables_world
    run = {
        "images": len(items), "backbone_load_seconds": load_seconds, "metric_seconds": metric_seconds,
        "images_per_second": len(items) / metric_seconds if metric_seconds > 0 else None,
        "embeddings_computed_clip": clip_cache.computed, "embeddings_computed_dino": dino_cache.computed,
        "identity_crops": len(scores.crops.keys), "device": str(scorers.clip.device),
        "backbones": _labels(scorers, cfg),
    }
    return metrics, tables, run


def write_outputs(metrics: dict[str, Any], tables: dict[str, pd.DataFrame], metrics_path: Path, out: Path,
                  run: dict[str, Any]) -> None:
    """`metrics_path` (DVC metrics: numbers only) and `out/` (CSV tables, DVC plot sources, eval.json with the run
    summary and backbones.json with the names and hashes of the backbones and the subject finder), each atomically."""
    from far.io import atomic_dir, write_json

    check_numbers_only(metrics)
    run = dict(run)
    labels = run.pop("backbones", {})
    with atomic_dir(out) as tmp:
        for name, df in tables.items():
            df.to_csv(tmp / f"{name}.csv", index=False, float_format="%.6g")
        write_json(tmp / "eval.json", _clean(run))
        write_json(tmp / "backbones.json", labels)
    write_json(metrics_path, metrics)
