"""Captions from a scene's ground truth, and the caption dropout the base model is pretrained with.

"a spotted red dog with blue ears on the beach", "a red dog and a yellow cat in the snow". Subjects are
named left to right. Pretraining drops attributes at random (`CaptionDropout`) so that the model also
answers partial prompts ("a dog", "a red dog on the grass"): the prompts personalization uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from far.world.render import Scene, Subject
from far.world.vocab import BACKGROUND_PHRASES, PART_NAMES, PATTERN_ADJECTIVES


def subject_phrase(
    s: Subject, body: bool = True, part: bool = True, pattern: bool = True, noun: str | None = None
) -> str:
    """'a spotted red dog with blue ears'; `noun` replaces the class word (e.g. '<far-dog-a> dog')."""
    words = []
    if pattern and PATTERN_ADJECTIVES[s.pattern]:
        words.append(PATTERN_ADJECTIVES[s.pattern])
    if body:
        words.append(s.body)
    words.append(noun or s.cls)
    if part:
        words += ["with", s.part, PART_NAMES[s.cls]]
    return with_article(" ".join(words))


def with_article(words: str) -> str:
    """'an orange dog', 'a red dog'."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def left_to_right(scene: Scene) -> list[Subject]:
    return sorted(scene.subjects, key=lambda s: s.cx)


def caption(scene: Scene) -> str:
    """The full caption: every subject with all its attributes, then the background."""
    return f"{join_phrases([subject_phrase(s) for s in left_to_right(scene)])} {BACKGROUND_PHRASES[scene.background]}"


@dataclass(frozen=True)
class CaptionDropout:
    """Probabilities of leaving each attribute out of a pretraining caption (independently per subject)."""

    body: float = 0.1
    part: float = 0.3
    pattern: float = 0.3
    background: float = 0.15

    def __call__(self, scene: Scene, rng: np.random.Generator) -> str:
        phrases = [
            subject_phrase(s, body=rng.random() >= self.body, part=rng.random() >= self.part,
                           pattern=rng.random() >= self.pattern)
            for s in left_to_right(scene)
        ]
        text = join_phrases(phrases)
        if rng.random() >= self.background:
            text += " " + BACKGROUND_PHRASES[scene.background]
        return text
