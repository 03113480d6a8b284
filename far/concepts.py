"""Concept identifier tokens: add them to the tokenizer, initialise their embeddings, find them in prompts.

Rule (ours; the paper does not say): a concept's `token` is split on whitespace; each word written in
angle brackets (`<far-dog>`, the textual-inversion convention) becomes ONE new token whose embedding starts
as the mean embedding of the class word's tokens (Custom Diffusion style). Any other word (`sks`) is an
existing rare token: its BPE pieces are used as they are and their existing rows are trained. So an
identifier may span several tokens (`"<a> <b>"`, or a word that BPE splits); the loss uses every one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from far.errors import InvalidInputError

NEW_TOKEN = re.compile(r"^<[^<>\s]+>$")


class ConceptLike(Protocol):
    """What is needed of a concept: far.config.ConceptSpec, or the record in far_delta.json."""

    name: str
    token: str
    class_word: str


@dataclass(frozen=True)
class ConceptTokens:
    """A concept's identifier as token ids. `new_tokens` lists the pieces that were added to the vocabulary."""

    name: str
    token: str  # the identifier text as written in params / prompts
    class_word: str
    token_ids: tuple[int, ...]  # ids of every token of the identifier, in prompt order
    new_tokens: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without BOS/EOS/padding."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def add_concept_tokens(tokenizer, text_encoder, subjects: Sequence[ConceptLike]) -> list[ConceptTokens]:
    """Register every concept's identifier with `tokenizer` / `text_encoder` (in place) and return the ids.

    New tokens get embedding rows initialised from the mean of their class word's token embeddings. Tokens
    that already exist in the tokenizer as added tokens (e.g. a pipeline `far.load` already patched) are
    reused, so calling this twice is harmless.
    """
    to_add: list[str] = []
    for spec in subjects:
        for word in spec.token.split():
            if NEW_TOKEN.match(word) and word not in tokenizer.get_vocab() and word not in to_add:
                to_add.append(word)
    if to_add:
        tokenizer.add_tokens(to_add)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for spec in subjects:
                class_ids = _text_ids(tokenizer, spec.class_word)
                if not class_ids:
                    raise InvalidInputError(f"concepts: class_word {spec.class_word!r} of {spec.name!r} has no tokens")
                init = emb[class_ids].mean(0)  # (D,)
                for word in spec.token.split():
                    if word in to_add:
                        emb[tokenizer.convert_tokens_to_ids(word)] = init
    out = []
    for spec in subjects:
        ids = _text_ids(tokenizer, spec.token)
        if not ids:
            raise InvalidInputError(f"concepts: token {spec.token!r} of {spec.name!r} tokenizes to nothing")
        new = tuple(w for w in spec.token.split() if NEW_TOKEN.match(w))
        out.append(ConceptTokens(spec.name, spec.token, spec.class_word, tuple(ids), new))
    _check_distinct(out)
    return out


def _check_distinct(concepts: Sequence[ConceptTokens]) -> None:
    seen: dict[tuple[int, ...], str] = {}
    for c in concepts:
        if c.token_ids in seen:
            raise InvalidInputError(
                f"concepts: tokens of {c.name!r} ({c.token!r}) and {seen[c.token_ids]!r} "
                f"give the same ids {c.token_ids}"
            )
        seen[c.token_ids] = c.name


def trained_token_ids(concepts: Sequence[ConceptTokens]) -> list[int]:
    """Sorted distinct ids of every identifier token (the embedding rows that are trained)."""
    return sorted({i for c in concepts for i in c.token_ids})


def find_token_positions(input_ids: Sequence[int] | torch.Tensor, token_ids: Sequence[int]) -> list[int]:
    """Positions in `input_ids` (one tokenized prompt, (T,)) of every occurrence of the id sequence `token_ids`.

    Matching is on ids, not text, so it is immune to spacing/case/punctuation around the identifier; every
    token of every occurrence is returned (a prompt may name a concept twice).
    """
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    n = len(token_ids)
    target = list(token_ids)
    positions: list[int] = []
    i = 0
    while i + n <= len(ids):
        if ids[i : i + n] == target:
            positions.extend(range(i, i + n))
            i += n
        else:
            i += 1
    return positions


def embedding_row_mask(num_rows: int, rows: Sequence[int]) -> torch.Tensor:
    """(num_rows, 1) float mask, 1 on `rows`: multiplied into the embedding gradient so only they train."""
    mask = torch.zeros(num_rows, 1)
    mask[list(rows)] = 1.0
    return mask


def keep_grad_only_on_rows(embedding: torch.nn.Embedding, rows: Sequence[int]) -> torch.utils.hooks.RemovableHandle:
    """Zero the gradient of every embedding row except `rows` (hook on the weight). Returns the hook handle.

    With a zero gradient and zero weight decay, Adam leaves those rows bit-identical (its moments stay 0).
    """
    mask = embedding_row_mask(embedding.weight.shape[0], rows).to(embedding.weight.device)
    return embedding.weight.register_hook(lambda grad: grad * mask.to(grad.dtype))
