"""Concept Fusion: compose the training set (data/fusion/train.parquet) from cut-outs, priors and backgrounds.

Four kinds of rows (far/dataset.py KINDS), counts from `fusion.*`:
- `reference`: each reference photo as it is (square crop around its subject), mask from segmentation;
- `single`: one subject, augmented (albumentations: flip, rotation, scale jitter, colour) and placed at a
  controlled scale on a new background;
- `fusion`: 2..K distinct concepts in one image, controlled scale and overlap, masks exclusive under
  occlusion (far/composite.py);
- `prior`: each class-prior image with its generation prompt and the mask of its class object (concept
  name "": the row names no concept, only its class word); a prior whose mask is flagged `empty`/`full`
  keeps image + prompt but has empty `concepts`/`class_words`/`masks` lists.

Determinism: example j of a kind is made only from the loaded inputs and its own seed, drawn from
(fusion.seed, kind, j); the row order is a seeded shuffle of all examples (so every streamed row group
mixes kinds). Neither depends on `fusion.workers` or timing: the same params give a byte-identical file.
Adding examples of one kind leaves the other kinds' examples unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from far.composite import Layer, composite, draw_outlines, feathered_alpha, mask_bbox, place_layers, plate, resize
from far.composite import resize_mask as _resize_mask
from far.config import ConceptsConfig, FusionConfig
from far.dataset import decode_image, decode_mask, encode_jpeg, encode_png, iter_rows, write_training_set
from far.errors import InvalidInputError
from far.fusion_inputs import Assets, ConceptInfo, Subject
from far.fusion_pool import WorkerPool
from far.io import atomic_file

KIND_CODES = {"reference": 0, "single": 1, "fusion": 2, "prior": 3}
PALETTE = [(255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (220, 64, 255), (0, 230, 230)]
PRIOR_COLOUR = (255, 255, 255)


def example_seed(seed: int, kind: str, index: int) -> int:
    """The seed of example `index` of `kind`: a 32-bit draw of SeedSequence(seed, kind code, index)."""
    return int(np.random.SeedSequence([seed, KIND_CODES[kind], index]).generate_state(1)[0])


def plan(cfg: FusionConfig, n_references: int, n_priors: int) -> list[tuple[str, int, int]]:
    """(kind, index within kind, seed) of every example, in the seeded row order of the file."""
    counts = {
        "reference": n_references if cfg.include_references else 0,
        "single": cfg.num_single,
        "fusion": cfg.num_multi,
        "prior": n_priors if cfg.include_priors else 0,
    }
    specs = [(kind, j, example_seed(cfg.seed, kind, j)) for kind, n in counts.items() for j in range(n)]
    order = np.random.default_rng([cfg.seed, 1_000_003]).permutation(len(specs))
    return [specs[i] for i in order]


def subject_phrase(concepts: list[ConceptInfo]) -> str:
    """'a <t1> dog', 'a <t1> dog and a <t2> dog', 'a <t1> dog, a <t2> dog and a <t3> cat'."""
    parts = [f"a {c.token} {c.class_word}" for c in concepts]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_augmenter(cfg: FusionConfig) -> Any:
    """Per-subject augmentation (an albumentations Compose), re-seeded per use; its applied parameters are
    recorded. Imported here, not at module level: the parent of the worker processes never needs it."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else importing it asks PyPI for a newer version
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.flip),
            A.Affine(rotate=(-cfg.rotate, cfg.rotate), scale=(1 - cfg.scale_jitter, 1 + cfg.scale_jitter),
                     keep_ratio=True, fit_output=True, border_mode=cv2.BORDER_CONSTANT, p=1.0),
            A.ColorJitter(brightness=cfg.colour, contrast=cfg.colour, saturation=cfg.colour, hue=0.0,
                          p=1.0 if cfg.colour > 0 else 0.0),
        ],
        save_applied_params=True,
    )


def _applied(applied: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The compact, JSON-able record of what albumentations did."""
    out: dict[str, Any] = {"flip": False}
    for name, p in applied:
        if name == "HorizontalFlip":
            out["flip"] = True
        elif name == "Affine":
            out["rotate"] = round(float(p["rotate"]), 4)
            out["scale_jitter"] = round(float(p["scale"]["x"]), 4)
        elif name == "ColorJitter":
            out |= {k: round(float(p[k]), 4) for k in ("brightness", "contrast", "saturation")}
    return out


class Composer:
    """Makes rows from the loaded assets; one per process (the pool forks it)."""

    def __init__(self, assets: Assets, cfg: FusionConfig) -> None:
        self.assets, self.cfg = assets, cfg
        self.side = assets.side
        self.feather = round(cfg.feather * self.side)
        self.augmenter = make_augmenter(cfg)
        self.by_name = {c.name: c for c in assets.concepts}
        weights = cfg.backgrounds.model_dump()  # reference / prior / plate -> relative weight
        self.bg_kinds = [k for k, w in weights.items() if w > 0 and (k == "plate" or assets.backgrounds.get(k))]
        if not self.bg_kinds:  # e.g. only prior backgrounds asked for, and there are no priors
            self.bg_kinds, weights = ["plate"], {"plate": 1.0}
        w = np.array([weights[k] for k in self.bg_kinds], dtype=np.float64)
        self.bg_weights = w / w.sum()

    # ------------------------------------------------------------------------------------------ parts
    def _layer(self, subject: Subject, scale: float, rng: np.random.Generator) -> tuple[Layer, dict[str, Any]]:
        """The subject resized so its longer side is `scale` * side, then augmented; fits in the canvas."""
        h, w = subject.mask.shape
        f = scale * self.side / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        rgb, mask = resize(subject.rgb, size), _resize_mask(subject.mask, size)
        self.augmenter.set_random_seed(int(rng.integers(2**31)))
        out = self.augmenter(image=rgb, mask=mask.view(np.uint8))
        aug_rgb, aug_mask = out["image"], out["mask"] > 0
        box = mask_bbox(aug_mask)
        params = _applied(out["applied_transforms"])
        if box is None:  # a sliver of a mask can vanish under rotation: keep the un-augmented subject
            aug_rgb, aug_mask, params = rgb, mask, {"flip": False, "augment_dropped": True}
        else:
            x0, y0, x1, y1 = box
            aug_rgb, aug_mask = aug_rgb[y0:y1, x0:x1], aug_mask[y0:y1, x0:x1]
        h, w = aug_mask.shape
        if max(h, w) > self.side:  # rotation / jitter grew it past the canvas
            g = self.side / max(h, w)
            size = (max(1, min(self.side, round(w * g))), max(1, min(self.side, round(h * g))))
            aug_rgb, aug_mask = resize(aug_rgb, size), _resize_mask(aug_mask, size)
        layer = Layer(np.ascontiguousarray(aug_rgb), aug_mask, feathered_alpha(aug_mask, self.feather))
        return layer, {"scale": round(scale, 4), **params}

    def _background(self, rng: np.random.Generator) -> tuple[np.ndarray, str, dict[str, Any]]:
        """(S, S, 3) uint8 background, its source id and how it was made."""
        kind = self.bg_kinds[int(rng.choice(len(self.bg_kinds), p=self.bg_weights))]
        if kind == "plate":
            style = self.cfg.plates[int(rng.integers(len(self.cfg.plates)))]
            return plate(style, self.side, rng), f"plate:{style}", {"kind": "plate", "plate": style}
        source, full = self.assets.backgrounds[kind][int(rng.integers(len(self.assets.backgrounds[kind])))]
        zoom = float(rng.uniform(self.cfg.background_zoom, 1.0))
        crop = max(1, round(zoom * self.side))
        x0, y0 = (int(v) for v in rng.integers(0, self.side - crop + 1, 2))
        flip = bool(rng.random() < 0.5)
        img = full[y0 : y0 + crop, x0 : x0 + crop]
        img = resize(img[:, ::-1] if flip else img, (self.side, self.side))
        info = {"kind": kind, "zoom": round(zoom, 4), "crop_xy": [x0, y0], "flip": flip}
        return np.ascontiguousarray(img), f"background:{kind}:{source}", info

    def _prompt(self, concepts: list[ConceptInfo], rng: np.random.Generator) -> tuple[str, int]:
        t = int(rng.integers(len(self.cfg.templates)))
        return self.cfg.templates[t].format(subjects=subject_phrase(concepts)), t

    def _encode(self, rgb: np.ndarray) -> bytes:
        if self.cfg.image_format == "png":
            return encode_png(rgb)
        return encode_jpeg(rgb, self.cfg.jpeg_quality)

    def _row(self, kind: str, j: int, seed: int, rgb: np.ndarray, prompt: str, concepts: list[str],
             class_words: list[str], masks: list[np.ndarray], sources: list[str], augment: dict) -> dict[str, Any]:
        return {
            "id": f"{kind}-{j:05d}", "kind": kind, "image": self._encode(rgb), "width": self.side,
            "height": self.side, "prompt": prompt, "concepts": concepts, "class_words": class_words,
            "masks": [encode_png(m) for m in masks], "sources": sources,
            "augment": json.dumps(augment, sort_keys=True), "seed": seed,
        }

    # ------------------------------------------------------------------------------------------ kinds
    def make(self, spec: tuple[str, int, int]) -> dict[str, Any]:
        """The row of one planned example (kind, index within kind, seed)."""
        kind, j, seed = spec
        rng = np.random.default_rng(seed)
        if kind == "reference":
            ref = self.assets.references[j]
            info = self.by_name[ref.concept]
            prompt, t = self._prompt([info], rng)
            return self._row(kind, j, seed, ref.rgb, prompt, [info.name], [info.class_word], [ref.mask],
                             [ref.source], {"crop": list(ref.crop), "template": t})
        if kind == "prior":
            pri = self.assets.priors[j]
            if pri.mask is None:  # no usable object mask: the row names nothing (see far/fusion_inputs.py)
                return self._row(kind, j, seed, pri.rgb, pri.prompt, [], [], [], [pri.source],
                                 {"crop": list(pri.crop), "mask": "unusable"})
            return self._row(kind, j, seed, pri.rgb, pri.prompt, [""], [pri.class_word], [pri.mask],
                             [pri.source], {"crop": list(pri.crop)})
        names = list(self.by_name)
        if kind == "single":
            chosen = [names[int(rng.integers(len(names)))]]
            lo, hi = self.cfg.single_scale
        else:
            k_max = min(self.cfg.max_concepts, len(names))
            if k_max < 2:
                raise ValueError("fusion examples need at least 2 concepts")  # guarded by the caller
            k = int(rng.integers(2, k_max + 1))
            chosen = [names[i] for i in rng.choice(len(names), size=k, replace=False)]
            lo, hi = self.cfg.multi_scale
        background, bg_source, bg_info = self._background(rng)
        subjects = [self.assets.subjects[n][int(rng.integers(len(self.assets.subjects[n])))] for n in chosen]
        layers, subject_info = [], []
        for subject in subjects:
            layer, info = self._layer(subject, float(rng.uniform(lo, hi)), rng)
            layers.append(layer)
            subject_info.append(info)
        z = [int(i) for i in rng.permutation(len(layers))]  # z[0] is pasted first (bottom)
        occluded = place_layers([layers[i] for i in z], self.side, rng, self.cfg.max_overlap,
                                self.cfg.placement_tries)
        image, z_masks = composite(background, [layers[i] for i in z])
        masks: list[np.ndarray] = [np.empty(0)] * len(layers)
        for rank, i in enumerate(z):
            masks[i] = z_masks[rank]
            subject_info[i] |= {"x": layers[i].x, "y": layers[i].y, "z": rank, "occluded": round(occluded[rank], 4)}
        infos = [self.by_name[n] for n in chosen]
        prompt, t = self._prompt(infos, rng)
        augment = {"background": bg_info, "subjects": subject_info, "template": t, "feather_px": self.feather}
        return self._row(kind, j, seed, image, prompt, chosen, [c.class_word for c in infos], masks,
                         [s.source for s in subjects] + [bg_source], augment)


def generate_rows(assets: Assets, cfg: FusionConfig, pool: WorkerPool | None = None) -> Iterator[dict[str, Any]]:
    """Rows in plan order: composed by `pool`'s processes (far/fusion_pool.py), or in-process without one."""
    n_concepts = len(assets.concepts)
    if cfg.num_multi and n_concepts < 2:
        raise InvalidInputError(f"fusion.num_multi: {cfg.num_multi} multi-concept examples need >= 2 concepts, "
                                f"params have {n_concepts}")
    specs = plan(cfg, len(assets.references), len(assets.priors))
    if pool is None:
        yield from map(Composer(assets, cfg).make, specs)
    else:
        yield from pool.imap(assets, cfg, specs)


def build_training_set(assets: Assets, cfg: FusionConfig, path: Path, pool: WorkerPool | None = None) -> dict[str, Any]:
    """Write the training Parquet atomically, streaming one row group at a time; returns counts per kind."""
    counts = dict.fromkeys(KIND_CODES, 0)

    def counted() -> Iterator[dict[str, Any]]:
        for row in generate_rows(assets, cfg, pool):
            counts[row["kind"]] += 1
            yield row

    total = write_training_set(counted(), path, row_group_size=cfg.row_group_size)
    return {"rows": total, "kinds": counts}


def _pick_preview_rows(path: Path, n: int) -> list[dict[str, Any]]:
    """Up to n rows, round-robin over kinds in file order (so every kind shows), streaming row groups."""
    per_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in KIND_CODES}
    for row in iter_rows(path, columns=["id", "kind", "image", "concepts", "masks"]):
        if len(per_kind[row["kind"]]) < n:
            per_kind[row["kind"]].append(row)
        if all(len(v) >= n for v in per_kind.values()):
            break
    picked: list[dict[str, Any]] = []
    for i in range(n):
        picked += [v[i] for v in per_kind.values() if i < len(v)]
    return picked[:n]


def write_preview(train: Path, n: int, out: Path, concept_names: list[str], tile: int = 256) -> int:
    """A grid PNG of n examples of `train` with each concept's mask outline in its colour; returns n shown.

    Colours follow `concept_names` order (PALETTE); prior rows' class-object masks are white.
    """
    rows = _pick_preview_rows(Path(train), n)
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(concept_names)}
    tiles = []
    for row in rows:
        rgb = resize(decode_image(row["image"]), (tile, tile))
        masks = [_resize_mask(decode_mask(m), (tile, tile)) for m in row["masks"]]
        img = draw_outlines(rgb, masks, [colour.get(c, PRIOR_COLOUR) for c in row["concepts"]])
        cv2.putText(img, row["id"], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, row["id"], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(img)
    cols = max(1, int(np.ceil(np.sqrt(max(1, len(tiles))))))
    rows_n = max(1, int(np.ceil(len(tiles) / cols)))
    grid = np.full((rows_n * tile, cols * tile, 3), 32, np.uint8)
    for i, img in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = img
    with atomic_file(out) as tmp:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        tmp.write_bytes(buf.tobytes())
    return len(tiles)


def fuse(
    segmented: Path, priors: Path | None, out: Path, concepts: ConceptsConfig, cfg: FusionConfig, side: int
) -> dict[str, Any]:
    """The `fuse` stage: `out/train.parquet`, `out/preview.png`, `out/summary.json`, written atomically.

    Nothing under `out` changes unless everything succeeds. Returns the summary.
    """
    from far.fusion_inputs import load_assets
    from far.io import atomic_dir, write_json

    need_priors = cfg.include_priors or cfg.backgrounds.prior > 0
    with contextlib.ExitStack() as stack:
        # workers start now, so their start-up overlaps with loading the inputs
        pool = stack.enter_context(WorkerPool(cfg.workers)) if cfg.workers > 1 else None
        assets = load_assets(Path(segmented), Path(priors) if priors and need_priors else None, concepts, cfg, side)
        tmp = stack.enter_context(atomic_dir(out))
        counts = build_training_set(assets, cfg, tmp / "train.parquet", pool)
        shown = write_preview(tmp / "train.parquet", cfg.preview, tmp / "preview.png", list(assets.subjects))
        summary = {
            **counts,
            "resolution": side,
            "row_group_size": cfg.row_group_size,
            "concepts": [c.name for c in assets.concepts],
            "references": len(assets.references),
            "priors": len(assets.priors),
            "priors_without_mask": assets.skipped_priors,
            "backgrounds": {k: len(v) for k, v in assets.backgrounds.items()} | {"plate": list(cfg.plates)},
            "preview_examples": shown,
            "params": cfg.model_dump(mode="json"),
        }
        write_json(tmp / "summary.json", summary)
    return summary
