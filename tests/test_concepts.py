"""far/concepts.py: identifier tokens, embedding initialisation, finding them in prompts, gradient masking."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from far.concepts import TokenRows, add_concept_tokens, find_token_positions, trained_token_ids
from far.errors import InvalidInputError
from far.tokenizer import build_clip_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer()


def _encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=1, max_position_embeddings=77))


def _c(name, token, class_word="dog"):
    return SimpleNamespace(name=name, token=token, class_word=class_word)


def test_new_tokens_are_added_and_start_from_the_class_word(tok):
    tok = build_clip_tokenizer()
    enc = _encoder()
    before = enc.get_input_embeddings().weight.detach().clone()
    out = add_concept_tokens(tok, enc, [_c("a", "<far-a>", "dog"), _c("b", "<far-b>", "golden retriever")])
    emb = enc.get_input_embeddings().weight
    assert emb.shape[0] == 49410 and len(tok) == 49410
    a, b = out
    assert len(a.token_ids) == 1 and a.new_tokens == ("<far-a>",)
    dog = tok("dog", add_special_tokens=False)["input_ids"]
    golden = tok("golden retriever", add_special_tokens=False)["input_ids"]
    assert len(golden) == 2
    torch.testing.assert_close(emb[a.token_ids[0]], before[dog].mean(0))
    torch.testing.assert_close(emb[b.token_ids[0]], before[golden].mean(0))
    torch.testing.assert_close(emb[:49408], before)  # the old vocabulary is untouched
    # the tokenizer now keeps the identifier whole, glued to punctuation or not
    ids = tok("a <far-a>, and <far-b>!", add_special_tokens=False)["input_ids"]
    assert a.token_ids[0] in ids and b.token_ids[0] in ids
    # idempotent: a second call (e.g. far.load on an already patched pipeline) adds nothing
    again = add_concept_tokens(tok, enc, [_c("a", "<far-a>"), _c("b", "<far-b>", "golden retriever")])
    assert [c.token_ids for c in again] == [a.token_ids, b.token_ids] and len(tok) == 49410


def test_existing_and_multi_token_identifiers(tok):
    tok = build_clip_tokenizer()
    enc = _encoder()
    out = add_concept_tokens(tok, enc, [_c("rare", "sks"), _c("pair", "<p1> <p2>"), _c("split", "zwxkqj")])
    rare, pair, split = out
    assert len(tok) == 49408 + 2  # only <p1>, <p2> are new
    assert rare.new_tokens == () and len(rare.token_ids) == 1 and rare.token_ids[0] < 49408
    assert pair.new_tokens == ("<p1>", "<p2>") and len(pair.token_ids) == 2
    assert len(split.token_ids) > 1  # BPE splits an unknown word: every piece belongs to the identifier
    assert set(trained_token_ids(out)) == set(rare.token_ids + pair.token_ids + split.token_ids)


def test_identical_identifiers_are_rejected(tok):
    with pytest.raises(InvalidInputError, match="'a' \\('sks'\\) and 'b' \\('sks '\\) give the same ids"):
        add_concept_tokens(build_clip_tokenizer(), _encoder(), [_c("a", "sks"), _c("b", "sks ")])


@pytest.mark.parametrize(("first", "second"), [("<p1>", "<p1> <p2>"), ("<p2>", "<p1> <p2>"),
                                               ("<p1> <p2> <p3>", "<p2>")])
def test_identifiers_whose_ids_occur_inside_another_are_rejected_naming_both(first, second):
    with pytest.raises(InvalidInputError, match=r"the ids of '(a|b)' .* occur inside those of '(a|b)'") as info:
        add_concept_tokens(build_clip_tokenizer(), _encoder(), [_c("a", first), _c("b", second)])
    message = str(info.value)
    assert repr(first) in message and repr(second) in message and "\n" not in message
    # sharing a token without one containing the other is fine: the positions stay apart
    add_concept_tokens(build_clip_tokenizer(), _encoder(), [_c("a", "<p1> <x>"), _c("b", "<p2> <x>")])


def test_find_token_positions_every_occurrence():
    ids = [49406, 320, 7, 8, 537, 7, 8, 9, 7, 49407]
    assert find_token_positions(ids, [7, 8]) == [2, 3, 5, 6]
    assert find_token_positions(torch.tensor(ids), [9]) == [7]
    assert find_token_positions(ids, [8, 9, 7]) == [6, 7, 8]
    assert find_token_positions(ids, [11]) == []


def test_token_rows_train_like_the_masked_full_table_and_leave_the_rest_bit_identical():
    """Own (N, D) parameter vs the whole table through AdamW with every other row's gradient zeroed (the
    previous implementation): same rows after several steps, the other rows untouched, same exports."""
    ids = torch.tensor([[49406, 5, 9, 320, 1125, 9, 49407]])
    rows = [5, 9]
    enc_full, enc_rows = _encoder(), _encoder()
    before = enc_rows.get_input_embeddings().weight.detach().clone()
    table = enc_full.get_input_embeddings().weight
    enc_full.requires_grad_(False)
    table.requires_grad_(True)
    mask = torch.zeros(table.shape[0], 1)
    mask[rows] = 1.0
    table.register_hook(lambda grad: grad * mask)
    enc_rows.requires_grad_(False)
    tokens = TokenRows.install(enc_rows, rows)
    assert [p.shape for p in enc_rows.parameters() if p.requires_grad] == [torch.Size([2, 32])]
    opt_full = torch.optim.AdamW([table], lr=1e-2, weight_decay=0.0)
    opt_rows = torch.optim.AdamW([tokens.rows], lr=1e-2, weight_decay=0.0)
    for step in range(4):
        for enc, opt in ((enc_full, opt_full), (enc_rows, opt_rows)):
            enc(ids)[0].pow(2).mean().mul(step + 1).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.testing.assert_close(tokens.rows.detach(), table.detach()[rows], atol=1e-6, rtol=1e-5)
    assert (tokens.rows.detach() - before[rows]).abs().min() > 0  # both rows did move
    torch.testing.assert_close(tokens.weight, table.detach(), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        live = enc_rows(ids)[0]
    tokens.merge(enc_rows)
    merged = enc_rows.get_input_embeddings()
    assert type(merged) is torch.nn.Embedding  # a plain text encoder again, for every export
    others = torch.ones(before.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(merged.weight[others], before[others])
    assert torch.equal(merged.weight[rows], tokens.rows.detach())
    with torch.no_grad():
        torch.testing.assert_close(enc_rows(ids)[0], live)
