"""far/tokenizer.py: the CLIPTokenizer built from clip-anytorch's BPE file splits text like OpenAI CLIP."""

from __future__ import annotations

import pytest

from far.tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer

PROMPTS = [
    "a photo of a sks dog",
    "A <far-dog> dog and a <far-dog3> dog on the beach!",
    "naïve café, 123 émoji 🐶 it's   A  Photo",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_openai_clip(prompt):
    clip = pytest.importorskip("clip")
    ours = build_clip_tokenizer()(prompt, padding="max_length", max_length=MODEL_MAX_LENGTH).input_ids
    reference = clip.tokenize(prompt)[0].tolist()
    end = reference.index(49407) + 1  # CLIP pads with 0, we pad with <|endoftext|>; compare the text part
    assert ours[:end] == reference[:end]
    assert len(ours) == MODEL_MAX_LENGTH


def test_vocabulary_size_and_special_tokens():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.model_max_length == MODEL_MAX_LENGTH
