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
    """Refuse identifiers whose token ids are equal, or where one's ids occur inside the other's (a prefix
    such as `<a>` of `<a> <b>`): their maps and losses would share prompt positions."""
    for i, a in enumerate(concepts):
        for b in concepts[i + 1 :]:
            short, long = (a, b) if len(a.token_ids) <= len(b.token_ids) else (b, a)
            if short.token_ids == long.token_ids:
                raise InvalidInputError(
                    f"concepts: tokens of {a.name!r} ({a.token!r}) and {b.name!r} ({b.token!r}) give the same ids "
                    f"{a.token_ids}; give each concept its own identifier"
                )
            n = len(short.token_ids)
            if any(long.token_ids[j : j + n] == short.token_ids for j in range(len(long.token_ids) - n + 1)):
                raise InvalidInputError(
                    f"concepts: the ids of {short.name!r} ({short.token!r}, {short.token_ids}) occur inside those of "
                    f"{long.name!r} ({long.token!r}, {long.token_ids}), so both would claim the same prompt "
                    "positions; use identifiers where neither's tokens appear within the other's"
                )


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


class TokenRows(torch.nn.Module):
    """The trained identifier rows of a token embedding, held as their own small parameter (N, D).

    Installed in place of the text encoder's input embedding: ids in `ids` read `rows`, every other id the
    frozen table, so the optimizer sees N x D values instead of the whole vocabulary. `merge()` writes the
    rows back into the table and puts the original embedding back (exports and far.load see a plain model).
    """

    def __init__(self, embedding: torch.nn.Embedding, ids: Sequence[int]) -> None:
        super().__init__()
        self.table = embedding  # frozen (vocab, D)
        self.ids = list(ids)  # sorted token ids; rows[i] is token ids[i]
        self.rows = torch.nn.Parameter(embedding.weight.detach()[self.ids].clone())  # (N, D)
        lookup = torch.full((embedding.weight.shape[0],), -1, dtype=torch.long)
        lookup[self.ids] = torch.arange(len(self.ids))
        self.register_buffer("lookup", lookup, persistent=False)  # token id -> row index, -1 if not trained

    @property
    def weight(self) -> torch.Tensor:
        """The table with the current rows written in (a copy, for code that reads `get_input_embeddings().weight`)."""
        return self.table.weight.detach().index_copy(0, self.lookup.new_tensor(self.ids), self.rows.detach())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        row = self.lookup[input_ids]  # (B, T), -1 where the frozen table applies
        trained = self.rows[row.clamp_min(0)]
        return torch.where((row >= 0).unsqueeze(-1), trained.to(self.table.weight.dtype), self.table(input_ids))

    @classmethod
    def install(cls, text_encoder, ids: Sequence[int]) -> TokenRows:
        rows = cls(text_encoder.get_input_embeddings(), ids)
        text_encoder.set_input_embeddings(rows)
        return rows

    def merge(self, text_encoder) -> None:
        """Write the trained rows into the table and put the plain embedding back into `text_encoder`."""
        with torch.no_grad():
            self.table.weight[self.ids] = self.rows.to(self.table.weight.dtype)
        text_encoder.set_input_embeddings(self.table)
