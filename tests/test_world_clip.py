"""The world CLIP's training parts: hard-negative captions and the contrastive loss that uses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from far.world.captions import CaptionDropout, caption
from far.world.clip import captions_with_negatives, contrastive_loss, exchange_loss, swapped
from far.world.render import sample_scene


@pytest.mark.parametrize("field", ["cls", "body", "exchange"])
def test_a_swap_changes_one_field_of_one_subject_and_nothing_else(field):
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng)
        other = swapped(scene, rng, field)
        diffs = [(a, b) for a, b in zip(scene.subjects, other.subjects, strict=True) if a != b]
        assert len(diffs) == 1
        a, b = diffs[0]
        changed = ("body", "part") if field == "exchange" else (field,)
        assert all(getattr(a, k) != getattr(b, k) for k in changed)
        if field == "exchange":
            assert (b.body, b.part) == (a.part, a.body)
        keep = [k for k in ("cls", "body", "part", "pattern", "cx", "cy", "size", "flip") if k not in changed]
        assert all(getattr(a, k) == getattr(b, k) for k in keep)
        assert b.body != b.part and (scene.background, scene.texture_seed) == (other.background, other.texture_seed)


def test_negatives_are_drawn_with_the_captions_own_dropout():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(40)]
    # Nothing dropped: the class-swapped negative differs from the full caption in one class word (and the
    # part's name when the class has another), the body-swapped one in one colour word.
    texts, negatives, exchanged = captions_with_negatives(scenes, CaptionDropout(0, 0, 0, 0),
                                                          np.random.default_rng(2), True)
    assert exchanged == [] and texts == [caption(s) for s in scenes]
    assert len(negatives) == 2 * len(scenes)
    for text, cls_neg, body_neg in zip(texts, negatives[0::2], negatives[1::2], strict=True):
        assert cls_neg != text
        words, body_words = text.split(), body_neg.split()  # "a red" may become "an orange"
        changed = [(a, b) for a, b in zip(words, body_words, strict=True) if a != b and {a, b} != {"a", "an"}]
        assert len(words) == len(body_words) and len(changed) == 1
    # Everything droppable dropped: the body swap says nothing new, the class swap still does.
    texts, negatives, _ = captions_with_negatives(scenes, CaptionDropout(1, 1, 1, 1), np.random.default_rng(2), True)
    assert negatives[1::2] == texts
    assert all(n != t for n, t in zip(negatives[0::2], texts, strict=True))
    assert captions_with_negatives(scenes, CaptionDropout(), np.random.default_rng(2), False)[1] == []


def _four_pairs() -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Four unit embeddings, each shared by an image and its caption; their loss without negatives."""
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    texts = ["a red dog", "a blue cat", "a dog", "a cup"]
    scale = torch.tensor(20.0)
    return img, texts, scale, contrastive_loss(img, img.clone(), img[:0], texts, [], scale)


def test_hard_negatives_penalise_an_embedding_that_cannot_tell_the_swap():
    img, texts, scale, without = _four_pairs()
    # A negative that embeds exactly like its caption halves the matching image's probability: ln 2 more on
    # one of the 4 image rows, in the half of the loss that reads images against captions...
    blind = contrastive_loss(img, img.clone(), img[:1].clone(), texts, ["a red cat"], scale)
    assert blind - without == pytest.approx(np.log(2) / 8, abs=2e-3)
    # ...a negative far from every image costs (almost) nothing...
    far_away = contrastive_loss(img, img.clone(), -img[:1].clone(), texts, ["a red cat"], scale)
    assert far_away == pytest.approx(without.item(), abs=1e-3)
    # ...and a "negative" identical to an image's caption (so embedded identically) is a positive for that image:
    # nothing pushes its embedding away from the image, while a true negative in its place is pushed.
    def push_on_negative(negative: str) -> float:
        neg = img[:1].clone().requires_grad_(True)
        contrastive_loss(img, img.clone(), neg, texts, [negative], scale).backward()
        return neg.grad.norm().item()

    assert push_on_negative("a red dog") < 1e-3 < 1.0 < push_on_negative("a red cat")


def test_exchanged_scenes_come_with_their_caption_under_the_same_dropout():
    scenes = [sample_scene(np.random.default_rng(k), 1) for k in range(20)]
    caps = captions_with_negatives(scenes, CaptionDropout(0, 0, 0, 0), np.random.default_rng(3), True, exchange=True)
    assert len(caps.negatives) == 3 * len(scenes) and len(caps.exchanged) == len(scenes)
    for scene, text, (other, other_text), negative in zip(scenes, caps.texts, caps.exchanged, caps.negatives[2::3],
                                                          strict=True):
        assert other_text == negative == caption(other) != text
        assert (other.subjects[0].body, other.subjects[0].part) == (scene.subjects[0].part, scene.subjects[0].body)
    # Both colours dropped: the exchanged scene's caption is the caption itself.
    caps = captions_with_negatives(scenes, CaptionDropout(1, 1, 0, 0), np.random.default_rng(3), False, exchange=True)
    assert [c for _, c in caps.exchanged] == caps.texts == caps.negatives


def test_an_image_negative_costs_only_where_its_caption_differs():
    img, texts, scale, without = _four_pairs()
    # An exchanged image that embeds exactly like the first image halves that caption's probability of it...
    blind = contrastive_loss(img, img.clone(), img[:0], texts, [], scale, img[:1].clone(), ["a blue dog"])
    assert blind - without == pytest.approx(np.log(2) / 8, abs=2e-3)

    # ...and one whose caption is the caption itself is not pushed away from it.
    def push(caption_of_negative: str) -> float:
        neg = img[:1].clone().requires_grad_(True)
        contrastive_loss(img, img.clone(), img[:0], texts, [], scale, neg, [caption_of_negative]).backward()
        return neg.grad.norm().item()

    assert push("a red dog") < 1e-3 < 1.0 < push("a blue dog")


def test_the_exchange_choice_is_chance_when_nothing_tells_the_pair_apart_and_small_when_everything_does():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 8), dim=-1)
    other = F.normalize(torch.randn(3, 8), dim=-1)
    texts, ex_texts = ["a red dog", "a blue cat", "a cup"], ["a blue dog", "a red cat", "a cup"]
    scale = torch.tensor(20.0)
    # The exchanged image and caption embed as the scene's own: each choice is a coin toss, log 2.
    same = exchange_loss(img, img, img, img, texts, ex_texts, scale)
    torch.testing.assert_close(same, torch.log(torch.tensor(2.0)))
    # The exchanged versions embed far away: both choices are easy.
    apart = exchange_loss(img, img, -img, -img, texts, ex_texts, scale)
    assert apart < 1e-6
    # Only the third scene changes, and its captions are one: it is left out, the loss does not move.
    moved = exchange_loss(img, img, torch.cat([-img[:2], other[2:]]), torch.cat([-img[:2], other[2:]]), texts,
                          ex_texts, scale)
    torch.testing.assert_close(moved, apart)
    assert exchange_loss(img, img, img, img, ["a dog"] * 3, ["a dog"] * 3, scale) == 0
