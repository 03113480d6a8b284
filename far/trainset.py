"""Training rows for the trainer: a deterministic, resumable stream of the fusion Parquet, and batches
with cached VAE latents and cached masks at each attention resolution.

Concept Fusion materialises every augmentation ahead of time, so a row's image never changes during a
run: its VAE latent (posterior mean, or one sample seeded by the row id: `train.latent`), its tokenized
prompt and its masks at every needed resolution are computed once, on first use, and kept for the run.
This removes the VAE encoder from every step after the first epoch. Every image and mask must be
`model.resolution` square (the fuse stage writes them so); any other size is an error, never resized.

Instance rows (reference, single, fusion) and prior rows are two streams dealt in the fixed ratio
`train.prior_ratio` (prior rows per instance row, DreamBooth's 1 by default): row j of the run is a prior
row exactly when floor((j + 1) s) > floor(j s), s = ratio / (1 + ratio), so any B consecutive rows hold
floor or ceil of B s priors and the first n rows exactly floor(n s) - a position alone resumes both streams.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from far.attention import selection_matrix
from far.concepts import ConceptTokens
from far.dataset import decode_image, decode_mask, open_training_set
from far.errors import InvalidInputError
from far.losses import downsample_mask
from far.models import vae_factor


class RowStream:
    """Endless row stream: epoch e visits the row groups in a permutation seeded by (seed, e) and shuffles
    the rows inside each group the same way. Only one row group is in memory at a time; `rows(start)`
    resumes at any global position (whole groups before it are skipped from the metadata, not read).
    `prior` True / False keeps only the prior / the instance rows (by `kind`); None keeps every row."""

    def __init__(self, path: Path | str, seed: int, prior: bool | None = None) -> None:
        self.path, self.seed, self.prior = Path(path), seed, prior
        self.file = open_training_set(path)
        groups = range(self.file.num_row_groups)
        if self.file.metadata.num_rows == 0:
            raise InvalidInputError(f"{path}: the training set has no rows")
        if prior is None:
            self.group_rows: list[list[int] | None] = [None for _ in groups]  # None: every row of the group
            self.group_sizes = [self.file.metadata.row_group(i).num_rows for i in groups]
        else:
            kinds = [self.file.read_row_group(i, columns=["kind"]).column("kind").to_pylist() for i in groups]
            self.group_rows = [[j for j, k in enumerate(ks) if (k == "prior") == prior] for ks in kinds]
            self.group_sizes = [len(r) for r in self.group_rows]
        self.num_rows = sum(self.group_sizes)

    def _order(self, epoch: int) -> tuple[list[int], np.random.Generator]:
        salt = [] if self.prior is None else [int(self.prior)]  # the two kinds' streams are shuffled apart
        rng = np.random.default_rng([self.seed, epoch, *salt])
        return list(rng.permutation(len(self.group_sizes))), rng

    def rows(self, start: int = 0) -> Iterator[dict[str, Any]]:
        if self.num_rows == 0:
            raise InvalidInputError(f"{self.path}: no {'prior' if self.prior else 'instance'} rows to stream")
        epoch, offset = divmod(start, self.num_rows)
        while True:
            order, rng = self._order(epoch)
            for g in order:
                perm = rng.permutation(self.group_sizes[g])  # drawn for every group, so skipping is exact
                if offset >= len(perm):
                    offset -= len(perm)
                    continue
                table = self.file.read_row_group(int(g)).to_pylist()
                index = self.group_rows[g]
                for i in perm[offset:]:
                    yield table[int(i) if index is None else index[int(i)]]
                offset = 0
            epoch += 1


class RatioStream:
    """The training rows: instance and prior rows dealt in the fixed ratio `prior_ratio` (module docstring)."""

    def __init__(self, path: Path | str, seed: int, prior_ratio: float) -> None:
        self.instance = RowStream(path, seed, prior=False)
        ratio = Fraction(prior_ratio).limit_denominator(1000)  # exact, so floor(n * share) never drifts
        self.share = ratio / (1 + ratio)  # of all rows, the prior ones
        self.prior = RowStream(path, seed, prior=True) if ratio > 0 else None
        self.num_rows = self.instance.file.metadata.num_rows
        if self.instance.num_rows == 0:
            raise InvalidInputError(f"{path}: no instance rows (kind reference, single or fusion) to train on")
        if self.prior is not None and self.prior.num_rows == 0:
            raise InvalidInputError(
                f"train.prior_ratio: {prior_ratio} needs prior rows, but {path} has none (kind 'prior'); "
                "set train.prior_ratio: 0, or keep fusion.include_priors: true and priors.per_class > 0"
            )

    def priors_before(self, n: int) -> int:
        """How many of the first `n` rows of the run are prior rows."""
        return math.floor(n * self.share)

    def rows(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """The run's rows from global position `start` on."""
        done = self.priors_before(start)
        instance = self.instance.rows(start - done)
        prior = self.prior.rows(done) if self.prior is not None else iter(())
        j = start
        while True:
            yield next(prior) if self.priors_before(j + 1) > self.priors_before(j) else next(instance)
            j += 1


@dataclass
class PreparedRow:
    latent: torch.Tensor  # (4, h, w), scaled by the VAE scaling factor
    input_ids: torch.Tensor  # (T,) long
    present: torch.Tensor  # (K,) bool: concept k is in the image (has a mask)
    masks: dict[int, torch.Tensor]  # factor f -> (K, (h/f) * (w/f)) soft masks in [0, 1]; f=1: latent resolution
    is_prior: bool


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 4, h, w)
    input_ids: torch.Tensor  # (B, T)
    selection: torch.Tensor  # (B, T, K): see far.attention.selection_matrix
    valid: torch.Tensor  # (B, K) bool: concept in the image AND its identifier in the prompt
    masks: dict[int, torch.Tensor]  # factor -> (B, K, HW) soft masks
    union: torch.Tensor  # (B, 1, h, w): union of the row's concept masks at latent resolution (soft)
    has_mask: torch.Tensor  # (B,) bool
    is_prior: torch.Tensor  # (B,) bool

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.latents.shape[-2], self.latents.shape[-1]


def _row_seed(seed: int, row_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little") >> 1


class RowPreparer:
    """Turns stream rows into model inputs, caching each row's latent / ids / masks by its `id`."""

    def __init__(
        self,
        tokenizer,
        vae,
        concepts: Sequence[ConceptTokens],
        resolution: int,
        factors: Sequence[int],
        latent_mode: str = "mean",
        seed: int = 0,
    ) -> None:
        self.tokenizer, self.vae, self.concepts = tokenizer, vae, list(concepts)
        self.resolution, self.latent_mode, self.seed = resolution, latent_mode, seed
        self.latent_side = resolution // vae_factor(vae)  # h = w of the latents
        self.factors = sorted({1, *factors})
        self.index = {c.name: k for k, c in enumerate(self.concepts)}
        self.cache: dict[str, PreparedRow] = {}

    def _image_and_masks(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """(R, R, 3) uint8 image, (K, R, R) bool masks and (K,) presence for one row."""
        r = self.resolution
        try:
            image = decode_image(row["image"])
            raw = [decode_mask(m) for m in row["masks"]]
        except ValueError as exc:
            raise InvalidInputError(f"training row {row['id']!r}: {exc}") from None
        sizes = [image.shape[:2], *(m.shape for m in raw)]
        if any(tuple(size) != (r, r) for size in sizes):
            bad = next(tuple(size) for size in sizes if tuple(size) != (r, r))
            raise InvalidInputError(
                f"training row {row['id']!r}: image or mask is {bad[1]}x{bad[0]} px, but model.resolution is {r}; "
                "re-run the fuse stage at this resolution (rows are never resized)"
            )
        masks = np.zeros((len(self.concepts), r, r), bool)
        present = torch.zeros(len(self.concepts), dtype=torch.bool)
        for name, m in zip(row["concepts"], raw, strict=True):
            k = self.index.get(name)
            if k is None:  # e.g. a class-prior subject: not a concept we learn
                continue
            masks[k] |= m
            present[k] = True
        return image, masks, present

    @torch.no_grad()
    def _encode(self, images: list[np.ndarray], ids: list[str]) -> torch.Tensor:
        """(N, 4, h, w) scaled latents of (R, R, 3) uint8 images.

        One image per VAE call: kernels pick algorithms by batch size, so a latent encoded beside other rows
        can differ in the last bit from the same row encoded alone, and a resumed run (empty cache, other
        groupings) would not end bit-identical to an uninterrupted one.
        """
        device, dtype = self.vae.device, self.vae.dtype
        out = []
        for image, row_id in zip(images, ids, strict=True):
            pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # (1, 3, R, R)
            dist = self.vae.encode(pixels.to(device, dtype)).latent_dist
            lat = dist.mean
            if self.latent_mode == "sample":
                g = torch.Generator().manual_seed(_row_seed(self.seed, row_id))
                lat = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device, dist.mean.dtype)
            out.append(lat)
        return (torch.cat(out) * self.vae.config.scaling_factor).float().cpu()

    def prepare(self, rows: Sequence[dict[str, Any]]) -> list[PreparedRow]:
        todo = [row for row in rows if row["id"] not in self.cache]
        if todo:
            decoded = [self._image_and_masks(row) for row in todo]
            latents = self._encode([d[0] for d in decoded], [row["id"] for row in todo])
            h = self.latent_side
            ids = self.tokenizer(
                [row["prompt"] for row in todo], padding="max_length", truncation=True,
                max_length=self.tokenizer.model_max_length, return_tensors="pt",
            ).input_ids
            for i, (row, (_, masks, present)) in enumerate(zip(todo, decoded, strict=True)):
                full = torch.from_numpy(masks)  # (K, R, R) bool
                by_factor = {f: downsample_mask(full, (h // f, h // f)).flatten(1) for f in self.factors}
                self.cache[row["id"]] = PreparedRow(latents[i], ids[i], present, by_factor, row["kind"] == "prior")
        return [self.cache[row["id"]] for row in rows]

    def batch(self, rows: Sequence[dict[str, Any]]) -> Batch:
        prepared = self.prepare(rows)
        input_ids = torch.stack([p.input_ids for p in prepared])
        present = torch.stack([p.present for p in prepared])
        selection, valid = selection_matrix(input_ids, [c.token_ids for c in self.concepts], present)
        masks = {f: torch.stack([p.masks[f] for p in prepared]) for f in self.factors}
        h = self.latent_side
        union = masks[1].amax(dim=1).view(-1, 1, h, h) if masks[1].shape[1] else torch.zeros(len(prepared), 1, h, h)
        return Batch(
            latents=torch.stack([p.latent for p in prepared]),
            input_ids=input_ids,
            selection=selection,
            valid=valid,
            masks=masks,
            union=union,
            has_mask=present.any(dim=1),
            is_prior=torch.tensor([p.is_prior for p in prepared]),
        )


def simple_composites(
    subjects: Sequence[Any], resolution: int, count: int, seed: int = 0, priors: int = 0
) -> list[dict[str, Any]]:
    """A small stand-in training set built without the fuse stage, for tests and benchmarks.

    Each `fusion` row puts a square centre crop of one reference photo of every subject side by side (random
    order and height) on a flat background; each mask is that crop's rectangle ({0,1}). `priors` extra
    rows are plain class photos (the references, flipped) with the class prompt and no concept.
    """
    from far.dataset import encode_png

    rng = np.random.default_rng(seed)
    photos = {}
    for s in subjects:
        files = sorted(p for p in Path(s.images).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if not files:
            raise InvalidInputError(f"{s.images}: no images for concept {s.name!r}")
        photos[s.name] = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]

    def crop(img: np.ndarray, size: int) -> np.ndarray:
        h, w = img.shape[:2]
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        return cv2.resize(img[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)

    rows = []
    cell = resolution // len(subjects)
    for i in range(count):
        canvas = np.full((resolution, resolution, 3), rng.integers(60, 200, 3), np.uint8)
        order = rng.permutation(len(subjects))
        masks, names, words, sources = [], [], [], []
        for slot, k in enumerate(order):
            s = subjects[int(k)]
            j = int(rng.integers(len(photos[s.name])))
            y = int(rng.integers(0, resolution - cell + 1))
            canvas[y : y + cell, slot * cell : (slot + 1) * cell] = crop(photos[s.name][j], cell)
            m = np.zeros((resolution, resolution), bool)
            m[y : y + cell, slot * cell : (slot + 1) * cell] = True
            masks.append(encode_png(m))
            names.append(s.name)
            words.append(s.class_word)
            sources.append(f"{s.name}/{j}")
        prompt = "a photo of " + " and ".join(f"{subjects[int(k)].token} {subjects[int(k)].class_word}" for k in order)
        rows.append({"id": f"fusion-{i:04d}", "kind": "fusion", "image": encode_png(canvas), "width": resolution,
                     "height": resolution, "prompt": prompt, "concepts": names, "class_words": words, "masks": masks,
                     "sources": sources, "augment": {"layout": "side_by_side"}, "seed": seed})
    for i in range(priors):
        s = subjects[i % len(subjects)]
        img = crop(photos[s.name][i % len(photos[s.name])], resolution)[:, ::-1].copy()
        rows.append({"id": f"prior-{i:04d}", "kind": "prior", "image": encode_png(img), "width": resolution,
                     "height": resolution, "prompt": f"a photo of a {s.class_word}", "concepts": [], "class_words": [],
                     "masks": [], "sources": [f"{s.name}/flip"], "augment": {"flip": True}, "seed": seed})
    return rows
