"""The FaR fine-tuning loop (Hugging Face accelerate): concept tokens, trainable presets, diffusion + prior +
Localized Refinement losses, dvclive logging, resumable checkpoints, and the delta as output.

`train` is four named parts: `setup` (models, tokens, optimizer, resume), `train_step` (one update),
`checkpoint` (every `checkpoint_every` steps) and `export` (the delta, once all steps are done).

One `step` is one optimizer update over `gradient_accumulation` micro-batches of `batch_size` rows per
process (rows are dealt out of one global stream, so N processes see N times the rows per step). Seeded and
deterministic on CPU: noise and timesteps come from a generator seeded by (seed, process), the stream is
seeded by `seed` alone, and all of it is checkpointed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from far.attention import AttentionCollector, install_concept_processors, select_layers
from far.checkpoint import find_resumable, load_checkpoint, save_checkpoint
from far.concepts import ConceptTokens, add_concept_tokens, trained_token_ids
from far.config import ConceptsConfig, TrainConfig
from far.delta import EMBEDDING_KEY, save_delta
from far.errors import FarError
from far.io import file_sha256
from far.losses import attention_in_mask, diffusion_target, per_sample_mse, refine_losses, split_prior
from far.modules import Trainable, describe, select_trainable
from far.trainset import Batch, RatioStream, RowPreparer, RowStream

METRICS = ("loss", "diffusion", "prior", "refine", "exclusivity", "attn_in_mask")


class TrainingDivergedError(FarError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


def base_record(base: Path) -> dict[str, Any]:
    """What identifies the base model: far_base.json (source, id/revision or tiny seed) and the UNet config."""
    rec = json.loads((base / "far_base.json").read_text()) if (base / "far_base.json").is_file() else {}
    unet_cfg = (base / "unet" / "config.json").read_text() if (base / "unet" / "config.json").is_file() else ""
    return {**rec, "unet_config_sha256": hashlib.sha256(unet_cfg.encode()).hexdigest()}


def step_loss(
    batch: Batch,
    unet,
    text_encoder,
    noise_scheduler,
    collector: AttentionCollector,
    layers: dict[str, int],
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    need_maps: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one micro-batch and its terms (floats, for logging)."""
    latents = batch.latents.to(device)  # (B, 4, h, w)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    context = text_encoder(batch.input_ids.to(device))[0]  # (B, T, D)
    train_refine = cfg.refine.weight > 0 or cfg.refine.exclusivity_weight > 0
    if need_maps:  # the caller stops the collector after backward (gradient checkpointing recomputes it)
        collector.start(batch.selection, batch.latent_size, keep_grad=train_refine)
    pred = unet(noisy, t, context).sample  # (B, 4, h, w)
    target = diffusion_target(noise_scheduler, latents, noise, t)
    weight = None
    if cfg.masked_loss:  # soft union of the concept masks; rows without any mask keep the plain loss
        union = batch.union.to(device)
        weight = torch.where(batch.has_mask.to(device).view(-1, 1, 1, 1), union, torch.ones_like(union))
    diffusion, prior = split_prior(per_sample_mse(pred, target, weight), batch.is_prior)
    loss = diffusion + cfg.prior_weight * prior
    terms = {"diffusion": diffusion.item(), "prior": prior.item()}
    if need_maps:
        masks = {name: batch.masks[f] for name, f in layers.items()}
        refine, excl = refine_losses(collector.maps, masks, batch.valid, cfg.refine.normalize)
        if train_refine:
            loss = loss + cfg.refine.weight * refine + cfg.refine.exclusivity_weight * excl
        terms |= {"refine": refine.item(), "exclusivity": excl.item()}
        terms["attn_in_mask"] = attention_in_mask(collector.maps, masks, batch.valid)
    terms["loss"] = loss.item()
    return loss, terms


@dataclass
class Run:
    """One training run between steps: the prepared models, optimizer, data stream and where it stands."""

    cfg: TrainConfig
    accelerator: Any
    unet: Any  # as prepared by accelerate (DDP-wrapped with several processes)
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    concepts: list[ConceptTokens]
    trainable: Trainable
    layers: dict[str, int]  # refine layer name -> latent side / map side
    collector: AttentionCollector
    optimizer: Any
    lr_scheduler: Any
    preparer: RowPreparer
    stream: RatioStream
    generator: torch.Generator  # re-seeded from (seed, step, rank) at every step: resuming needs no RNG state
    fingerprint: str
    record: dict[str, Any]  # base model, data and resolution, for far_delta.json
    emb_index: int | None  # the token rows' index among the optimizer's parameters
    live: Any = None  # dvclive.Live on the main process
    step: int = 0
    position: int = 0  # global rows consumed (all processes)
    last_ckpt: Path | None = None
    seen: dict[str, int] = field(default_factory=lambda: {"instance": 0, "prior": 0})  # rows this process trained on
    rows: Iterator[dict[str, Any]] | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return _trained_tensors(self.trainable, self.accelerator.unwrap_model(self.unet))


def setup(
    cfg: TrainConfig,
    concepts_cfg: ConceptsConfig,
    base: Path,
    data: Path,
    checkpoints: Path,
    live_dir: Path | None,
    resolution: int | None = None,
    log: Callable[[str], None] = print,
) -> Run:
    """Load the base model, add the concept tokens, choose what trains, prepare it with accelerate and resume
    from the newest checkpoint of this exact run (if any). `resolution` None: the base model's native size."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from far.models import check_resolution, load_base_pipeline, vae_factor

    # AcceleratorState is a process-wide singleton: a second run in the same process (tests, notebooks) with
    # another mixed_precision would be refused. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    pipe = load_base_pipeline(base)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    factor = vae_factor(vae)
    resolution = resolution or unet.config.sample_size * factor
    check_resolution(pipe, resolution, base)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    concepts = add_concept_tokens(tokenizer, text_encoder, concepts_cfg.subjects)
    token_ids = trained_token_ids(concepts) if cfg.train_token_embeddings else []
    trainable = select_trainable(unet, text_encoder, cfg.modules, token_ids, cfg.lora_rank)
    log(describe(trainable, cfg.modules))
    emb = trainable.embedding
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    layers = select_layers(unet, cfg.refine.downscale, factor, cfg.refine.blocks)
    collector = AttentionCollector()
    install_concept_processors(unet, collector, layers)

    groups = [{"params": list(trainable.unet_params.values()), "weight_decay": cfg.weight_decay}]
    if emb is not None:  # no weight decay on the identifier rows (Custom Diffusion's choice too)
        groups.append({"params": [emb], "weight_decay": 0.0, "lr": cfg.token_learning_rate or cfg.learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps)
    if emb is not None:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:  # a frozen module must not be wrapped in DistributedDataParallel (it refuses modules without grads)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        text_encoder.to(device)
    vae.to(device).eval()  # only encodes (cached latents)
    unet.train()
    text_encoder.train(emb is not None)

    stream = RatioStream(data, cfg.seed, cfg.prior_ratio)
    data_sha = file_sha256(data)
    record = {"base": base_record(base), "data": {"path": str(data), "sha256": data_sha, "rows": stream.num_rows},
              "resolution": resolution}
    fingerprint = hashlib.sha256(
        json.dumps(
            {"train": cfg.model_dump(mode="json"), "concepts": [c.to_dict() for c in concepts],
             "base": record["base"], "data": data_sha, "world": accelerator.num_processes, "resolution": resolution},
            sort_keys=True,
        ).encode()
    ).hexdigest()
    preparer = RowPreparer(tokenizer, vae, concepts, resolution, sorted(set(layers.values())), cfg.latent, cfg.seed)
    run = Run(cfg, accelerator, unet, text_encoder, tokenizer, noise_scheduler, concepts, trainable, layers, collector,
              optimizer, lr_scheduler, preparer, stream, torch.Generator(), fingerprint, record,
              len(groups[0]["params"]) if emb is not None else None)
    _resume(run, checkpoints, live_dir, log)
    if run.main and live_dir is not None:
        from dvclive import Live

        run.live = Live(dir=str(live_dir), resume=bool(run.last_ckpt), save_dvc_exp=False, dvcyaml=None, report=None)
    run.rows = stream.rows(run.position)
    return run


def _resume(run: Run, checkpoints: Path, live_dir: Path | None, log: Callable[[str], None]) -> None:
    """Restore the newest checkpoint whose fingerprint matches (stale ones are deleted)."""
    ckpt = find_resumable(checkpoints, run.fingerprint) if run.main else None
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        ckpt = broadcast_object_list([str(ckpt) if ckpt else ""])[0]
    if not ckpt:
        return
    resumed = load_checkpoint(Path(ckpt), run.optimizer, run.lr_scheduler, run.generator,
                              live_dir if run.main else None)
    _apply(resumed.tensors, run.trainable, run.accelerator.unwrap_model(run.unet))
    run.step, run.position, run.last_ckpt = resumed.step, resumed.position, Path(ckpt)
    log(f"train: resuming from {ckpt} (step {run.step})")


def train_step(run: Run) -> dict[str, float]:
    """One optimizer update over `gradient_accumulation` micro-batches; returns the mean loss terms.

    Raises TrainingDivergedError when a loss is not finite (nothing is updated then)."""
    cfg, acc = run.cfg, run.accelerator
    world, rank = acc.num_processes, acc.process_index
    terms: dict[str, float] = defaultdict(float)
    run.generator.manual_seed(_step_seed(cfg.seed, run.step, rank))
    train_refine = cfg.refine.weight > 0 or cfg.refine.exclusivity_weight > 0
    need_maps = train_refine or (run.step + 1) % cfg.log_every == 0 or run.step + 1 == cfg.steps
    per_step = cfg.batch_size * world
    for micro in range(cfg.gradient_accumulation):
        global_rows = [next(run.rows) for _ in range(per_step)]
        run.position += per_step
        batch = run.preparer.batch(global_rows[rank * cfg.batch_size : (rank + 1) * cfg.batch_size])
        with acc.autocast():
            loss, micro_terms = step_loss(batch, run.unet, run.text_encoder, run.noise_scheduler, run.collector,
                                          run.layers, cfg, run.generator, acc.device, need_maps)
        if not math.isfinite(micro_terms["loss"]):
            run.collector.stop()
            detail = ", ".join(f"{k}={v:.4g}" for k, v in micro_terms.items())
            raise TrainingDivergedError(
                f"train: loss is not finite at step {run.step + 1} ({detail}); stopped without writing the delta. "
                f"Last good checkpoint: {run.last_ckpt or 'none'}. Lower train.learning_rate or "
                "use mixed_precision: no/bf16."
            )
        sync = micro == cfg.gradient_accumulation - 1
        with contextlib.nullcontext() if sync else acc.no_sync(run.unet):
            acc.backward(loss / cfg.gradient_accumulation)
        run.collector.stop()
        prior = int(batch.is_prior.sum())
        run.seen["prior"] += prior
        run.seen["instance"] += len(batch.is_prior) - prior
        for k, v in micro_terms.items():
            terms[k] += v / cfg.gradient_accumulation
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return dict(terms)


def log_step(run: Run, terms: dict[str, float], log: Callable[[str], None]) -> None:
    """dvclive metrics and one log line on logging steps (every `log_every` and the last)."""
    cfg = run.cfg
    if not (run.step % cfg.log_every == 0 or run.step == cfg.steps):
        return
    if run.live is not None:
        run.live.step = run.step
        for k in METRICS:
            if k in terms and not math.isnan(terms[k]):
                run.live.log_metric(f"train/{k}", terms[k])
        run.live.log_metric("train/lr", run.lr_scheduler.get_last_lr()[0])
        run.live.make_summary()
    log(f"step {run.step}/{cfg.steps} " + " ".join(f"{k}={v:.4f}" for k, v in sorted(terms.items())))


def checkpoint(run: Run, checkpoints: Path, live_dir: Path | None) -> None:
    """Save a resumable checkpoint on the main process every `checkpoint_every` steps and at the last one."""
    cfg = run.cfg
    if run.main and (run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps):
        run.last_ckpt = save_checkpoint(
            checkpoints, run.step, run.position, run.fingerprint, run.trained_tensors(), run.optimizer,
            run.lr_scheduler, run.generator, run.emb_index, run.trainable.embedding_rows, live_dir,
            cfg.keep_checkpoints,
        )
    run.accelerator.wait_for_everyone()


def export(run: Run, out: Path) -> None:
    """Write the delta (main process): the token rows go back into the embedding table first, so every
    export reads a plain text encoder."""
    if not run.main:
        return
    unet, text_encoder = run.accelerator.unwrap_model(run.unet), run.accelerator.unwrap_model(run.text_encoder)
    tensors = run.trained_tensors()
    if run.trainable.tokens is not None:
        run.trainable.tokens.merge(text_encoder)
    ids = run.trainable.embedding_rows
    new = {t for c in run.concepts for t in c.new_tokens}
    meta = {
        "concepts": [c.to_dict() for c in run.concepts],
        "token_rows": [{"token": tok, "id": i, "new": tok in new}
                       for i, tok in zip(ids, run.tokenizer.convert_ids_to_tokens(ids), strict=True)],
        "modules": run.cfg.modules, "lora_rank": run.cfg.lora_rank, "refine_layers": run.layers,
        "base": run.record["base"], "params": run.cfg.model_dump(mode="json"), "data": run.record["data"],
        "counts": run.trainable.count(), "resolution": run.record["resolution"],
    }
    save_delta(out, tensors, meta, unet, text_encoder, run.tokenizer)


def train(
    cfg: TrainConfig,
    concepts_cfg: ConceptsConfig,
    base: Path,
    data: Path,
    out: Path,
    checkpoints: Path,
    live_dir: Path | None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    resolution: int | None = None,
) -> dict[str, Any]:
    """Train, checkpointing every `cfg.checkpoint_every` steps and resuming from the newest matching
    checkpoint; writes the delta to `out` when `cfg.steps` are done. `stop_after` ends this process after
    that many steps (as if killed just after a checkpoint; used to test resuming). `resolution`: the
    `model.resolution` to train at (None: the base model's native size). Returns a summary."""
    base, data, out, checkpoints = Path(base), Path(data), Path(out), Path(checkpoints)
    run = setup(cfg, concepts_cfg, base, data, checkpoints, live_dir, resolution, log)
    ran = 0
    while run.step < cfg.steps and (stop_after is None or ran < stop_after):
        terms = train_step(run)
        ran += 1
        log_step(run, terms, log)
        checkpoint(run, checkpoints, live_dir)
    if run.live is not None:
        run.live.end()
    summary = {"steps": run.step, "done": run.step >= cfg.steps, "out": str(out), "rows": dict(run.seen),
               **run.trainable.count()}
    if run.step >= cfg.steps:
        export(run, out)
    run.accelerator.wait_for_everyone()
    return summary


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1


def _trained_tensors(trainable: Trainable, unet) -> dict[str, torch.Tensor]:
    """`unet.<name>` for every trained UNet tensor, plus the identifier rows of the token embedding (N, D)."""
    named = dict(unet.named_parameters())
    tensors = {f"unet.{n}": named[n] for n in trainable.unet_params}
    if trainable.embedding is not None:
        tensors[EMBEDDING_KEY] = trainable.embedding
    return tensors


def _apply(tensors: dict[str, torch.Tensor], trainable: Trainable, unet) -> None:
    """Copy checkpointed tensors back into the live modules (in place, so the optimizer keeps its params)."""
    named = dict(unet.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            p = trainable.embedding if key == EMBEDDING_KEY else named[key.removeprefix("unet.")]
            p.copy_(value.to(p.device, p.dtype))


@torch.no_grad()
def measure_attention_in_mask(
    pipe, delta: Path | None, data: Path, concepts_cfg: ConceptsConfig, downscale: list[int],
    timesteps: tuple[int, ...] = (200, 500, 800), seed: int = 0, max_rows: int = 64, resolution: int | None = None,
) -> float:
    """Mean share of each concept token's attention inside its own mask over the rows of `data` (fixed noise
    at fixed timesteps), for `pipe` with the delta in `delta` applied (or the base model if None)."""
    from diffusers import DDPMScheduler

    from far.delta import load as load_delta
    from far.models import vae_factor

    if delta is not None:
        load_delta(pipe, delta)
    concepts = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts_cfg.subjects)
    factor = vae_factor(pipe.vae)
    layers = select_layers(pipe.unet, downscale, factor)
    collector = AttentionCollector()
    install_concept_processors(pipe.unet, collector, layers)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    resolution = resolution or pipe.unet.config.sample_size * factor
    preparer = RowPreparer(pipe.tokenizer, pipe.vae, concepts, resolution, sorted(set(layers.values())), "mean", seed)
    stream = RowStream(data, seed)
    rows = [r for r, _ in zip(stream.rows(0), range(min(max_rows, stream.num_rows)), strict=False)]
    rows = [r for r in rows if r["concepts"]]
    scores, gen = [], torch.Generator().manual_seed(seed)
    for i in range(0, len(rows), 8):
        batch = preparer.batch(rows[i : i + 8])
        context = pipe.text_encoder(batch.input_ids)[0]
        for t in timesteps:
            noise = torch.randn(batch.latents.shape, generator=gen)
            tt = torch.full((len(batch.latents),), t)
            collector.start(batch.selection, batch.latent_size, keep_grad=False)
            pipe.unet(scheduler.add_noise(batch.latents, noise, tt), tt, context)
            collector.stop()
            masks = {name: batch.masks[f] for name, f in layers.items()}
            scores.append(attention_in_mask(collector.maps, masks, batch.valid))
    return float(sum(scores) / len(scores))
