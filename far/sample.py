"""The sample stage: evaluation images from the base model + FaR delta, with each concept token's attention.

For every prompt of `far.prompts.build_prompts` and every seed in `sample.seeds`, one image is generated
by the ordinary `StableDiffusionPipeline.__call__` (negative prompt, guidance and scheduler exactly as
diffusers handles them). Each image's latents come from its own `torch.Generator` seeded with its seed, so
an image does not depend on which batch it landed in, and the same params give the same images on CPU.

While sampling, far/attention.py's processor (the one the train stage uses) computes the probabilities
of the concept tokens' columns in the chosen layers (`sample.attention_downscale`, image pixels per map
cell, like `train.refine.downscale`); every other attention layer keeps the fused kernel. For each image
and concept the map of the concept's identifier token(s) is averaged over heads, layers and denoising
steps, for the text-conditioned half of the guidance batch only, and saved normalised to max 1 as float32
(float16 left a near-uniform map two distinct values).

Output (`data/samples/`): `<prompt_idx:03d>_<seed>.png`, `attn/<prompt_idx:03d>_<seed>_<concept>.npy`
(soft map in [0, 1], (S, S) with S the finest chosen layer's side), `manifest.parquet`, `sample.json`.
A killed run resumes: finished images in the `.samples.partial` work directory are kept when the
params and models are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from far.attention import (
    AttentionCollector,
    cross_attention_layers,
    install_concept_processors,
    remove_concept_processors,
    selection_matrix,
)
from far.concepts import NEW_TOKEN
from far.config import ConceptsConfig, SampleConfig
from far.errors import FarError, InvalidInputError
from far.io import atomic_file, remove_stale_tmp, write_json
from far.progress import diffusers_progress_config, progress
from far.prompts import PromptSpec, build_prompts

MANIFEST = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("prompt_idx", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("template", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # single | multi
        pa.field("concepts", pa.list_(pa.string()), nullable=False),  # concept names named by the prompt
        pa.field("class_words", pa.list_(pa.string()), nullable=False),  # same order as `concepts`
        pa.field("tokens", pa.list_(pa.string()), nullable=False),  # same order as `concepts`
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # image, relative to the samples directory
        pa.field("attention", pa.list_(pa.string()), nullable=False),  # .npy per concept, same order
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)
SCHEDULERS = {  # sample.scheduler -> diffusers class name, built from the model's own scheduler config
    "ddim": "DDIMScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


# ------------------------------------------------------------------------------------ attention capture
class StepMaps:
    """Sums far.attention's per-forward maps over denoising steps and layers, for one batch of prompts.

    far.attention.AttentionCollector keeps one UNet forward's maps, per layer (B_attn, HW, K); this adds
    them up after every step (upsampled to the finest chosen layer) and re-arms the collector.
    """

    def __init__(self, collector: AttentionCollector, layers: dict[str, int], latent_side: int):
        self.collector, self.layers, self.latent_side = collector, layers, latent_side
        self.side = latent_side // min(layers.values())  # S: maps of coarser layers are upsampled to it
        self.sum = torch.zeros(0)
        self.steps = 0
        self.selection = torch.zeros(0)
        self.rows = slice(0)

    def start(self, selection: torch.Tensor, guided: bool) -> None:
        """selection: (B, T, K) for the text-conditioned prompts; diffusers puts the unconditional half first."""
        batch = selection.shape[0]
        self.selection = torch.cat([torch.zeros_like(selection), selection]) if guided else selection
        self.rows = slice(batch, 2 * batch) if guided else slice(0, batch)
        self.sum = torch.zeros(batch, selection.shape[2], self.side, self.side)  # (B, K, S, S)
        self.steps = 0
        self.collector.start(self.selection, (self.latent_side, self.latent_side), keep_grad=False)

    def step_end(self) -> None:
        """Add the last forward's maps (every chosen layer) and re-arm the collector for the next step."""
        missing = sorted(set(self.layers) - set(self.collector.maps))
        if missing:
            raise FarError(f"no attention maps were captured in {missing[:3]} (attention processors replaced?)")
        for name, maps in self.collector.maps.items():
            side = self.latent_side // self.layers[name]
            m = maps[self.rows].float().transpose(1, 2).reshape(-1, maps.shape[2], side, side)  # (B, K, s, s)
            if side != self.side:
                m = F.interpolate(m, size=(self.side, self.side), mode="bilinear", align_corners=False)
            self.sum += m.cpu()
        self.steps += 1
        self.collector.start(self.selection, (self.latent_side, self.latent_side), keep_grad=False)

    def result(self) -> torch.Tensor:
        """(B, K, S, S) float32, each map divided by its max (as the refine loss does): values in [0, 1]."""
        self.collector.stop()
        peak = self.sum.amax(dim=(2, 3), keepdim=True)
        return torch.where(peak > 0, self.sum / peak.clamp_min(1e-12), self.sum)


def choose_layers(unet: Any, downscale: list[int], vae_factor: int) -> dict[str, int]:
    """Cross-attention layers with one map cell per `downscale` image pixels (as train.refine.downscale).

    Raises InvalidInputError naming `sample.attention_downscale` and the values this UNet offers.
    """
    layers = cross_attention_layers(unet)  # name -> latent side / map side
    available = sorted({f * vae_factor for f in layers.values()})
    unknown = [d for d in downscale if d not in available]
    if unknown:
        raise InvalidInputError(
            f"params.yaml: sample.attention_downscale: {unknown} is invalid: this UNet has cross-attention "
            f"layers at downscale {available} (image pixels per map cell)"
        )
    return {name: f for name, f in layers.items() if f * vae_factor in downscale}


def concept_token_ids(tokenizer: Any, concepts: ConceptsConfig, where: Path) -> list[list[int]]:
    """Each concept's identifier as token ids, in params order (far.concepts' rule for new `<...>` tokens).

    Every `<...>` word must already be a token (far.load adds them); otherwise the delta was not trained
    for these concepts and sampling would silently use an untrained embedding.
    """
    vocab = tokenizer.get_vocab()
    out = []
    for c in concepts.subjects:
        absent = [w for w in c.token.split() if NEW_TOKEN.match(w) and w not in vocab]
        if absent:
            raise InvalidInputError(
                f"concepts: token {c.token!r} ({c.name}) is unknown to the model from {where} ({absent} not in "
                f"its tokenizer): was the delta trained for these concepts?"
            )
        out.append(list(tokenizer(c.token, add_special_tokens=False).input_ids))
    return out


# ------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Job:
    spec: PromptSpec
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.spec.index:03d}_{self.seed}"


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap in `sample.scheduler` built from the model's scheduler config ("default" keeps the model's)."""
    if name == "default":
        return
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def apply_delta(pipe: Any, delta: Path) -> None:
    """Apply the trained FaR delta (`models/far`) in place: new token rows + trained UNet tensors."""
    from far import load

    load(pipe, delta)


def generate(pipe: Any, jobs: list[Job], concepts: ConceptsConfig, cfg: SampleConfig, out: Path,
             where: Path | None = None, resolution: int | None = None) -> None:
    """Generate `jobs` into `out` in batches of `cfg.batch_size`; each image's maps go to `out/attn/`.

    The .npy maps are written before the image, so an image on disk means the job is complete.
    """
    token_ids = concept_token_ids(pipe.tokenizer, concepts, where or out)
    names = [c.name for c in concepts.subjects]
    layers = choose_layers(pipe.unet, cfg.attention_downscale, pipe.vae_scale_factor)
    collector = AttentionCollector()
    install_concept_processors(pipe.unet, collector, layers)
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor  # None: the native size
    maps = StepMaps(collector, layers, resolution // pipe.vae_scale_factor)
    pipe.set_progress_bar_config(**diffusers_progress_config())
    guided = cfg.guidance_scale > 1  # diffusers' rule for classifier-free guidance

    def step_end(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        maps.step_end()
        return kwargs

    (out / "attn").mkdir(parents=True, exist_ok=True)
    batches = [jobs[i : i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]
    for batch in progress(batches, desc="sample", unit="batch"):
        prompts = [j.spec.prompt for j in batch]
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # (B, T)
        named = torch.tensor([[n in j.spec.concepts for n in names] for j in batch])  # (B, K) bool
        selection, valid = selection_matrix(ids, token_ids, named)  # (B, T, K), (B, K)
        if not torch.equal(valid, named):
            b = int((valid != named).any(dim=1).nonzero()[0])
            raise InvalidInputError(f"a concept token is missing from the tokenized prompt {prompts[b]!r} (too long?)")
        maps.start(selection, guided)
        images = pipe(
            prompt=prompts,
            negative_prompt=[cfg.negative_prompt] * len(batch) if cfg.negative_prompt else None,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            height=resolution,
            width=resolution,
            output_type="pil",
            callback_on_step_end=step_end,
        ).images
        result = maps.result().numpy().astype(np.float32)  # (B, K, S, S)
        for b, (job, image) in enumerate(zip(batch, images, strict=True)):
            for name in job.spec.concepts:
                with atomic_file(out / "attn" / f"{job.stem}_{name}.npy") as tmp, open(tmp, "wb") as fh:
                    np.save(fh, result[b, names.index(name)])
            with atomic_file(out / f"{job.stem}.png") as tmp:
                image.save(tmp, format="PNG")
    remove_concept_processors(pipe.unet)


def manifest_rows(jobs: list[Job], concepts: ConceptsConfig, out: Path) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        specs = [concepts.by_name(n) for n in job.spec.concepts]
        with Image.open(out / f"{job.stem}.png") as im:
            width, height = im.size
        rows.append({
            "prompt_idx": job.spec.index, "prompt": job.spec.prompt, "template": job.spec.template,
            "kind": job.spec.kind, "concepts": list(job.spec.concepts), "class_words": [c.class_word for c in specs],
            "tokens": [c.token for c in specs], "seed": job.seed, "path": f"{job.stem}.png",
            "attention": [f"attn/{job.stem}_{n}.npy" for n in job.spec.concepts], "width": width, "height": height,
        })
    return rows


def _fingerprint(base: Path, delta: Path | None, cfg: SampleConfig, concepts: ConceptsConfig,
                 resolution: int | None = None) -> str:
    """What the images depend on; a partial run is resumed only if this is unchanged."""
    h = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), concepts.model_dump(mode="json"), resolution]).encode())
    files = [base / "far_base.json", base / "model_index.json"]
    if delta is not None:
        files += sorted(p for p in delta.glob("*") if p.is_file())
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def run_sample(base: Path, delta: Path | None, out: Path, cfg: SampleConfig, concepts: ConceptsConfig,
               pipe: Any | None = None, resolution: int | None = None) -> dict[str, Any]:
    """The whole stage: load, apply the delta, generate what is missing, write the manifest, publish `out`.

    `delta=None` samples the base model (tests pass a `pipe` they prepared themselves). Returns the
    summary also written to `out/sample.json`.
    """
    from far.models import check_resolution, load_base_pipeline

    specs = build_prompts([(c.name, c.token, c.class_word) for c in concepts.subjects], cfg.prompts_per_concept,
                          cfg.multi_prompts, cfg.multi_max_concepts, cfg.live_classes)
    jobs = [Job(spec, seed) for spec in specs for seed in cfg.seeds]
    if pipe is None:
        if not (base / "model_index.json").is_file():
            raise InvalidInputError(f"{base}: no base model (run the `base_model` stage)")
        pipe = load_base_pipeline(base)
        if delta is not None:
            if not delta.is_dir():
                raise InvalidInputError(f"{delta}: no trained delta (run the `train` stage)")
            apply_delta(pipe, delta)
    concept_token_ids(pipe.tokenizer, concepts, delta or base)  # fail before any work on unknown tokens
    choose_layers(pipe.unet, cfg.attention_downscale, pipe.vae_scale_factor)
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor  # `model.resolution`
    check_resolution(pipe, resolution, base)
    set_scheduler(pipe, cfg.scheduler)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")

    work = out.parent / f".{out.name}.partial"  # survives a kill; reused only for identical inputs
    key = _fingerprint(base, delta, cfg, concepts, resolution)
    if work.exists() and not ((work / ".key").is_file() and (work / ".key").read_text() == key):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / ".key").write_text(key)
    todo = [j for j in jobs if not (work / f"{j.stem}.png").is_file()]
    start = time.perf_counter()
    if todo:
        generate(pipe, todo, concepts, cfg, work, where=delta or base, resolution=resolution)
    seconds = time.perf_counter() - start
    table = pa.Table.from_pylist(manifest_rows(jobs, concepts, work), schema=MANIFEST_SCHEMA)
    pq.write_table(table, work / MANIFEST, compression="zstd")
    summary = {
        "images": len(jobs), "generated": len(todo), "resumed": len(jobs) - len(todo),
        "prompts": len(specs), "seconds": round(seconds, 2),
        "images_per_second": round(len(todo) / seconds, 3) if todo else None,
        "device": str(pipe.device), "scheduler": type(pipe.scheduler).__name__,
        "resolution": resolution, "attention_side": resolution // min(cfg.attention_downscale),
        "params": cfg.model_dump(mode="json"), "base": str(base), "delta": str(delta) if delta else None,
        "base_model": _base_name(base),
    }
    write_json(work / "sample.json", summary)
    (work / ".key").unlink()
    _publish(work, out)
    return summary


def _base_name(base: Path) -> str | None:
    """What models/base is (`far_base.json`: "tiny" or the HF id / path it was resolved from)."""
    record = base / "far_base.json"
    if not record.is_file():
        return None
    info = json.loads(record.read_text())
    return f"{info.get('pretrained')} ({info.get('source')})"


def _publish(work: Path, out: Path) -> None:
    """Replace `out` by the finished work directory (rename; the old output survives until then)."""
    remove_stale_tmp(out)
    old = out.parent / f".{out.name}.tmp-old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)
