"""Cheap capture of concept tokens' cross-attention maps in selected UNet layers.

Only the cross-attention layers the loss needs get `ConceptAttnProcessor`; every other layer keeps its
fused kernel. Even there the layer's output is still computed by `F.scaled_dot_product_attention`; the
probabilities are formed explicitly only for the token columns some concept uses:

    logits = q k^T * scale                  # (B, heads, HW, T): all T=77 columns, cheap at 8x8 / 16x16
    lse    = logsumexp(logits, -1)          # (B, heads, HW, 1): the softmax denominator needs every column
    P[..., cols] = exp(logits[..., cols] - lse)   # only the concept columns are materialised
    maps   = mean_heads(P[..., cols]) @ S[:, cols, :]  # (B, HW, K): one map per concept

`S` (B, T, K) is the selection matrix: column k averages concept k's token positions in each prompt, so a
multi-token identifier's map is the mean of its tokens' maps (our choice; the paper does not say).
No map of any other token or layer is ever stored. The sample stage reuses the same processor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from far.concepts import find_token_positions
from far.errors import InvalidInputError

_BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\.")


class AttentionCollector:
    """Holds the current batch's selection matrix and receives each selected layer's maps (one forward)."""

    def __init__(self) -> None:
        self.enabled = False
        self.keep_grad = True  # False: maps are for logging only (detached q, k)
        self.selection: torch.Tensor | None = None  # (B, T, K) float: column k averages concept k's tokens
        self.columns: torch.Tensor | None = None  # (n,) long: token positions used by any concept in the batch
        self.latent_size: tuple[int, int] | None = None  # (h, w) of the UNet input, to check layer resolutions
        self.maps: dict[str, torch.Tensor] = {}  # layer name -> (B, HW, K), probabilities in [0, 1]

    def start(self, selection: torch.Tensor, latent_size: tuple[int, int], keep_grad: bool = True) -> None:
        """Arm for one forward pass with selection (B, T, K); clears the previous maps. When training with
        gradient checkpointing, call `stop()` only after backward (the recomputation must match)."""
        self.enabled, self.keep_grad = True, keep_grad
        self.selection = selection
        self.columns = torch.nonzero(selection.abs().sum(dim=(0, 2)) > 0).flatten()
        self.latent_size = latent_size
        self.maps = {}

    def stop(self) -> None:
        self.enabled = False
        self.selection = self.columns = None


class ConceptAttnProcessor:
    """SDPA attention that also hands the concept columns' head-averaged probabilities to a collector."""

    def __init__(self, collector: AttentionCollector, name: str, factor: int) -> None:
        self.collector, self.name, self.factor = collector, name, factor  # factor: latent side / map side

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # (B, HW, C) (or (B, C, H, W))
        encoder_hidden_states: torch.Tensor | None = None,  # (B, T, D)
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, hw, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))  # (B, h, N, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        self._collect(attn, q, k, attention_mask, hw)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _collect(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, hw: int) -> None:
        col = self.collector
        # Under gradient checkpointing the block runs again during backward, and must save the same tensors:
        # so the collector stays armed until after backward, the maps are recomputed, the first ones kept.
        if not col.enabled or col.selection is None:
            return
        if col.latent_size is not None:
            lh, lw = col.latent_size
            expected = (lh // self.factor) * (lw // self.factor)
            if hw != expected:
                raise RuntimeError(f"{self.name}: {hw} query positions, expected {expected} (1/{self.factor} latent)")
        if not col.keep_grad:
            q, k = q.detach(), k.detach()
        # fp32 for a stable lse: under mixed precision autocast would run these matmuls in bf16/fp16 whatever
        # the inputs' dtype (up to 2.7 % off the fp32 softmax in bf16), so it is switched off here.
        with torch.autocast(device_type=q.device.type, enabled=False):
            logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scale  # (B, h, HW, T)
            if mask is not None:
                logits = logits + mask.float()
            lse = logits.logsumexp(dim=-1, keepdim=True)  # (B, h, HW, 1)
            cols = col.columns.to(logits.device)
            probs = (logits[..., cols] - lse).exp().mean(dim=1)  # (B, HW, n): head-averaged, concept columns only
            sel = col.selection.to(logits.device, torch.float32)[:, cols, :]  # (B, n, K)
            maps = probs @ sel  # (B, HW, K), fp32
        col.maps.setdefault(self.name, maps)


def cross_attention_layers(unet) -> dict[str, int]:
    """Every cross-attention processor name of a UNet2DConditionModel -> latent side / its map side.

    Down block i works at 1/2^i of the latent, the mid block at the coarsest level, up block j at
    1/2^(n-1-j) (each block but the last changes resolution once), as in every SD UNet.
    """
    n = len(unet.config.block_out_channels)
    layers: dict[str, int] = {}
    for name in unet.attn_processors:
        if ".attn2." not in name:  # attn1 is self-attention
            continue
        m = _BLOCK.match(name)
        if m is None:
            continue
        kind, idx = m.group(1), int(m.group(2) or 0)
        level = {"down_blocks": idx, "mid_block": n - 1, "up_blocks": n - 1 - idx}[kind]
        layers[name] = 2**level
    return layers


def select_layers(unet, downscale: Sequence[int], vae_factor: int, blocks: str = "all") -> dict[str, int]:
    """Cross-attention layers whose maps have one cell per `downscale` image pixels (`vae_factor` image pixels
    per latent cell, `far.models.vae_factor`, times the layer's latent/map factor).

    Raises InvalidInputError naming the available values when nothing matches.
    """
    layers = cross_attention_layers(unet)
    wanted = {d // vae_factor for d in downscale if d % vae_factor == 0}
    chosen = {
        name: f for name, f in layers.items() if f in wanted and (blocks == "all" or name.startswith(blocks))
    }
    if not chosen:
        available = sorted({f * vae_factor for f in layers.values()})
        raise InvalidInputError(
            f"train.refine.downscale {list(downscale)} / blocks {blocks!r}: no cross-attention layer there; "
            f"this UNet has cross-attention at downscale {available}"
        )
    return chosen


def install_concept_processors(unet, collector: AttentionCollector, layers: dict[str, int]) -> None:
    """Give the `layers` a ConceptAttnProcessor; every other layer gets (keeps) the fused SDPA processor."""
    procs = {}
    for name, proc in unet.attn_processors.items():
        if name in layers:
            procs[name] = ConceptAttnProcessor(collector, name, layers[name])
        elif isinstance(proc, ConceptAttnProcessor):
            procs[name] = AttnProcessor2_0()
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)


def remove_concept_processors(unet) -> None:
    """Back to plain SDPA in every layer that had a ConceptAttnProcessor."""
    unet.set_attn_processor(
        {n: AttnProcessor2_0() if isinstance(p, ConceptAttnProcessor) else p for n, p in unet.attn_processors.items()}
    )


def selection_matrix(
    input_ids: torch.Tensor, concept_token_ids: Sequence[Sequence[int]], present: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection matrix S (B, T, K) and validity (B, K) bool for tokenized prompts (B, T).

    S[b, t, k] = 1/n_bk on the n_bk positions of concept k's identifier in prompt b (all occurrences).
    valid[b, k] is True when the identifier occurs (and `present[b, k]`, if given: the concept is in the image).
    """
    bsz, length = input_ids.shape
    sel = torch.zeros(bsz, length, len(concept_token_ids))
    for b in range(bsz):
        for k, ids in enumerate(concept_token_ids):
            if present is not None and not bool(present[b, k]):
                continue
            pos = find_token_positions(input_ids[b], ids)
            if pos:
                sel[b, pos, k] = 1.0 / len(pos)
    return sel, sel.sum(dim=1) > 0
