"""The FaR fine-tuning loop (Hugging Face accelerate): concept tokens, trainable presets, diffusion + prior +
Localized Refinement losses, dvclive logging, resumable checkpoints, and the delta as output.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from far.attention import AttentionCollector, install_concept_processors, select_layers
from far.checkpoint import find_resumable, load_checkpoint, save_checkpoint
from far.concepts import add_concept_tokens, keep_grad_only_on_rows, trained_token_ids
from far.config import ConceptsConfig, TrainConfig
from far.delta import EMBEDDING_KEY, save_delta
from far.errors import FarError
from far.io import file_sha256
from far.losses import attention_in_mask, diffusion_target, per_sample_mse, refine_losses, split_prior
from far.modules import describe, select_trainable
from far.trainset import Batch, RowPreparer, RowStream

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
) -> dict[str, Any]:
    """Train, checkpointing every `cfg.checkpoint_every` steps and resuming from the newest matching
    checkpoint; writes the delta to `out` when `cfg.steps` are done. `stop_after` ends this process after
    that many steps (as if killed just after a checkpoint; used to test resuming). Returns a summary."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from far.models import load_base_pipeline

    base, data, out, checkpoints = Path(base), Path(data), Path(out), Path(checkpoints)
    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton: a second run in the same process (tests, notebooks) with
    # another mixed_precision would be refused. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device, main = accelerator.device, accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    pipe = load_base_pipeline(base)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = unet.config.sample_size * 8

    concepts = add_concept_tokens(tokenizer, text_encoder, concepts_cfg.subjects)
    token_rows = trained_token_ids(concepts) if cfg.train_token_embeddings else []
    trainable = select_trainable(unet, text_encoder, cfg.modules, token_rows, cfg.lora_rank)
    log(describe(trainable, cfg.modules))
    emb = trainable.embedding
    if emb is not None:
        keep_grad_only_on_rows(text_encoder.get_input_embeddings(), token_rows)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    layers = select_layers(unet, cfg.refine.downscale, cfg.refine.blocks)
    collector = AttentionCollector()
    install_concept_processors(unet, collector, layers)

    groups = [{"params": list(trainable.unet_params.values()), "weight_decay": cfg.weight_decay}]
    if emb is not None:  # no weight decay: untrained rows must stay bit-identical (their grads are zeroed)
        groups.append({"params": [emb], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps)
    if emb is not None:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:  # a frozen module must not be wrapped in DistributedDataParallel (it refuses modules without grads)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        text_encoder.to(device)
    vae.to(device).eval()
    text_encoder.train(emb is not None)
    emb_index = len(groups[0]["params"]) if emb is not None else None

    stream = RowStream(data, cfg.seed)
    data_sha = file_sha256(data)
    world, rank = accelerator.num_processes, accelerator.process_index
    resolved = cfg.model_dump(mode="json")
    fingerprint = hashlib.sha256(
        json.dumps(
            {"train": resolved, "concepts": [c.to_dict() for c in concepts], "base": base_record(base),
             "data": data_sha, "world": world},
            sort_keys=True,
        ).encode()
    ).hexdigest()
    generator = torch.Generator()  # re-seeded from (seed, step, rank) at every step: resuming needs no RNG state
    step, position = 0, 0
    ckpt = find_resumable(checkpoints, fingerprint) if main else None
    if world > 1:
        from accelerate.utils import broadcast_object_list

        ckpt = broadcast_object_list([str(ckpt) if ckpt else ""])[0]
    if ckpt:
        resumed = load_checkpoint(Path(ckpt), optimizer, lr_scheduler, generator, emb_index,
                                  emb.shape if emb is not None else None, live_dir if main else None)
        _apply(resumed.tensors, trainable, accelerator.unwrap_model(unet), text_encoder)
        step, position = resumed.step, resumed.position
        log(f"train: resuming from {ckpt} (step {step})")

    live = None
    if main and live_dir is not None:
        from dvclive import Live

        live = Live(dir=str(live_dir), resume=bool(ckpt), save_dvc_exp=False, dvcyaml=None, report=None)
    preparer = RowPreparer(tokenizer, vae, concepts, resolution, sorted(set(layers.values())), cfg.latent, cfg.seed)
    rows = stream.rows(position)
    per_step = cfg.batch_size * world
    params = [p for g in groups for p in g["params"]]
    train_refine = cfg.refine.weight > 0 or cfg.refine.exclusivity_weight > 0
    last_ckpt = ckpt
    ran = 0
    while step < cfg.steps and (stop_after is None or ran < stop_after):
        terms: dict[str, float] = defaultdict(float)
        generator.manual_seed(_step_seed(cfg.seed, step, rank))
        need_maps = train_refine or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        for micro in range(cfg.gradient_accumulation):
            global_rows = [next(rows) for _ in range(per_step)]
            position += per_step
            batch = preparer.batch(global_rows[rank * cfg.batch_size : (rank + 1) * cfg.batch_size])
            with accelerator.autocast():
                loss, micro_terms = step_loss(batch, unet, text_encoder, noise_scheduler, collector, layers, cfg,
                                              generator, device, need_maps)
            if not math.isfinite(micro_terms["loss"]):
                collector.stop()
            if not math.isfinite(micro_terms["loss"]):
                detail = ", ".join(f"{k}={v:.4g}" for k, v in micro_terms.items())
                raise TrainingDivergedError(
                    f"train: loss is not finite at step {step + 1} ({detail}); stopped without writing "
                    f"{out}. Last good checkpoint: {last_ckpt or 'none'}. Lower train.learning_rate or "
                    "use mixed_precision: no/bf16."
                )
            sync = micro == cfg.gradient_accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(unet):
                accelerator.backward(loss / cfg.gradient_accumulation)
            collector.stop()
            for k, v in micro_terms.items():
                terms[k] += v / cfg.gradient_accumulation
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ran += 1
        if live is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            live.step = step
            for k in METRICS:
                if k in terms and not math.isnan(terms[k]):
                    live.log_metric(f"train/{k}", terms[k])
            live.log_metric("train/lr", lr_scheduler.get_last_lr()[0])
            live.make_summary()
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps} " + " ".join(f"{k}={v:.4f}" for k, v in sorted(terms.items())))
        if main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            last_ckpt = save_checkpoint(
                checkpoints, step, position, fingerprint, _trained_tensors(trainable, accelerator.unwrap_model(unet)),
                optimizer, lr_scheduler, generator, emb_index, token_rows, live_dir, cfg.keep_checkpoints,
            )
        accelerator.wait_for_everyone()
    if live is not None:
        live.end()
    summary = {"steps": step, "done": step >= cfg.steps, "out": str(out), **trainable.count()}
    if step >= cfg.steps and main:
        unwrapped = accelerator.unwrap_model(unet)
        meta = {
            "concepts": [c.to_dict() for c in concepts],
            "token_rows": [{"token": tok, "id": i, "new": any(tok in c.new_tokens for c in concepts)}
                           for i, tok in zip(token_rows, tokenizer.convert_ids_to_tokens(token_rows), strict=True)],
            "modules": cfg.modules, "lora_rank": cfg.lora_rank, "refine_layers": layers,
            "base": base_record(base), "params": resolved,
            "data": {"path": str(data), "sha256": data_sha, "rows": stream.num_rows},
            "counts": trainable.count(), "resolution": resolution,
        }
        save_delta(out, _trained_tensors(trainable, unwrapped), meta, unwrapped,
                   accelerator.unwrap_model(text_encoder), tokenizer)
    accelerator.wait_for_everyone()
    return summary


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1


def _trained_tensors(trainable, unet) -> dict[str, torch.Tensor]:
    """`unet.<name>` for every trained UNet tensor, plus the identifier rows of the token embedding."""
    named = dict(unet.named_parameters())
    tensors = {f"unet.{n}": named[n] for n in trainable.unet_params}
    if trainable.embedding is not None:
        tensors[EMBEDDING_KEY] = trainable.embedding[trainable.embedding_rows]
    return tensors


def _apply(tensors: dict[str, torch.Tensor], trainable, unet, text_encoder) -> None:
    """Copy checkpointed tensors back into the live modules (in place, so the optimizer keeps its params)."""
    named = dict(unet.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key == EMBEDDING_KEY:
                trainable.embedding[trainable.embedding_rows] = value.to(trainable.embedding.dtype)
            else:
                p = named[key.removeprefix("unet.")]
                p.copy_(value.to(p.device, p.dtype))


@torch.no_grad()
def measure_attention_in_mask(
    pipe, delta: Path | None, data: Path, concepts_cfg: ConceptsConfig, downscale: list[int],
    timesteps: tuple[int, ...] = (200, 500, 800), seed: int = 0, max_rows: int = 64,
) -> float:
    """Mean share of each concept token's attention inside its own mask over the rows of `data` (fixed noise
    at fixed timesteps), for `pipe` with the delta in `delta` applied (or the base model if None)."""
    from diffusers import DDPMScheduler

    from far.delta import load as load_delta

    if delta is not None:
        load_delta(pipe, delta)
    concepts = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts_cfg.subjects)
    layers = select_layers(pipe.unet, downscale)
    collector = AttentionCollector()
    install_concept_processors(pipe.unet, collector, layers)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    preparer = RowPreparer(pipe.tokenizer, pipe.vae, concepts, pipe.unet.config.sample_size * 8,
                           sorted(set(layers.values())), "mean", seed)
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
