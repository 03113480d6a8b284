"""Trainable-module presets (params `train.modules`), each combinable with the concept-token embeddings.

- `crossattn_kv`: key and value projections of every cross-attention layer (attn2.to_k / to_v): the FaR
  and Custom Diffusion default; they only see text features, so they change what a token *means*.
- `crossattn`: attn2 query, key, value and output projections.
- `lora`: low-rank adapters (peft) on q, k, v, out of every attention layer (self and cross), rank
  `train.lora_rank`, alpha = rank (scale 1; our choice).
- `unet`: every UNet parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from far.concepts import TokenRows

PRESETS = ("crossattn_kv", "crossattn", "lora", "unet")
_SUFFIXES = {
    "crossattn_kv": ("attn2.to_k.", "attn2.to_v."),
    "crossattn": ("attn2.to_q.", "attn2.to_k.", "attn2.to_v.", "attn2.to_out.0."),
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_ADAPTER = "far"


@dataclass
class Trainable:
    """The UNet parameters being trained (names as in `unet.state_dict()`), and the embedding rows."""

    unet_params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    tokens: TokenRows | None = None  # installed in the text encoder; its `rows` (N, D) train

    @property
    def embedding_rows(self) -> list[int]:
        """Token ids whose embedding rows train, in the order of `embedding`'s rows."""
        return self.tokens.ids if self.tokens is not None else []

    @property
    def embedding(self) -> torch.nn.Parameter | None:
        """The trained identifier rows (N, D), or None."""
        return self.tokens.rows if self.tokens is not None else None

    def count(self) -> dict[str, int]:
        unet = sum(p.numel() for p in self.unet_params.values())
        emb = self.embedding.numel() if self.embedding is not None else 0
        return {"unet": unet, "token_embeddings": emb, "total": unet + emb}


def add_lora(unet, rank: int) -> None:
    """Attach a peft LoRA adapter named `far` to the UNet's attention projections."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    unet.add_adapter(config, adapter_name=LORA_ADAPTER)


def select_trainable(
    unet, text_encoder, preset: str, token_ids: list[int] | None, lora_rank: int = 4
) -> Trainable:
    """Freeze everything, then unfreeze `preset` in `unet` (adding LoRA layers for `lora`) and, if
    `token_ids` is given, install `far.concepts.TokenRows` in the text encoder: those rows train as their
    own parameter (call `trainable.tokens.merge(text_encoder)` to write them back when done)."""
    if preset not in PRESETS:
        raise ValueError(f"train.modules: {preset!r} is not one of {PRESETS}")
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if preset == "lora":
        add_lora(unet, lora_rank)  # peft marks only the lora_A / lora_B weights trainable
        chosen = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    elif preset == "unet":
        chosen = dict(unet.named_parameters())
    else:
        chosen = {n: p for n, p in unet.named_parameters() if any(s in n for s in _SUFFIXES[preset])}
    for p in chosen.values():
        p.requires_grad_(True)
    if not chosen:
        raise ValueError(f"train.modules: {preset!r} matched no UNet parameter")
    out = Trainable(unet_params=chosen)
    if token_ids:
        out.tokens = TokenRows.install(text_encoder, sorted(set(token_ids)))
    return out


def describe(trainable: Trainable, preset: str) -> str:
    c = trainable.count()
    return (
        f"trainable: {c['total']:,} parameters ({preset}: {c['unet']:,} in {len(trainable.unet_params)} UNet tensors"
        f"; token embeddings: {c['token_embeddings']:,} in {len(trainable.embedding_rows)} rows)"
    )
