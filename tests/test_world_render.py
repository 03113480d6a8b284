"""far/world/render.py and far/world/captions.py: determinism, exact masks under occlusion, captions."""

from __future__ import annotations

import numpy as np
import pytest

from far.world import render as render_module
from far.world.captions import caption, subject_phrase
from far.world.render import Scene, Subject, coverage, render, sample_scene

# A hand-built occlusion: the dog stands behind (smaller cy) and the cat, nearer, covers its right half.
BACK = Subject("dog", "red", "blue", "plain", cx=0.4, cy=0.55, size=0.5)
FRONT = Subject("cat", "yellow", "purple", "plain", cx=0.62, cy=0.7, size=0.5)


def test_scenes_and_pixels_are_deterministic_from_a_seed():
    a, b = sample_scene(np.random.default_rng(7)), sample_scene(np.random.default_rng(7))
    assert a == b
    (img_a, masks_a), (img_b, masks_b) = render(a), render(b)
    assert img_a.dtype == np.uint8 and img_a.shape == (64, 64, 3)
    assert masks_a.shape == (len(a.subjects), 64, 64)
    assert np.array_equal(img_a, img_b) and np.array_equal(masks_a, masks_b)
    other = sample_scene(np.random.default_rng(8))
    assert other != a and not np.array_equal(render(other)[0], img_a)


def test_the_back_subject_loses_exactly_the_covered_pixels(monkeypatch):
    # One sample per pixel: the renderer's occlusion logic is exact on its own sampling grid.
    monkeypatch.setattr(render_module, "SUPERSAMPLE", 1)
    (back_alone,) = render(Scene("snow", (BACK,)))[1]
    front_img, (front_alone,) = render(Scene("snow", (FRONT,)))
    img, (back, front) = render(Scene("snow", (BACK, FRONT)))
    covered = back_alone & front_alone
    assert covered.sum() > 50  # the scene really overlaps
    assert np.array_equal(back, back_alone & ~front_alone)
    assert np.array_equal(front, front_alone)
    assert not (back & front).any()
    assert np.array_equal(img[front], front_img[front])  # where the cat is visible, its pixels are drawn
    # Depth comes from cy, not from the order the scene lists its subjects in.
    _, (front_2, back_2) = render(Scene("snow", (FRONT, BACK)))
    assert np.array_equal(front_2, front) and np.array_equal(back_2, back)


def test_masks_never_overlap_at_the_shipped_supersampling():
    (back_alone,) = render(Scene("snow", (BACK,)))[1]
    (front_alone,) = render(Scene("snow", (FRONT,)))[1]
    _, (back, front) = render(Scene("snow", (BACK, FRONT)))
    assert np.array_equal(front, front_alone)  # nothing stands in front of the cat
    assert not (back & ~back_alone).any()  # occlusion only removes pixels
    assert not (back & front).any()
    assert (back_alone & ~back).sum() >= (back_alone & front_alone).sum() > 50
    rng = np.random.default_rng(3)
    for _ in range(12):  # anti-aliased edges of touching subjects: every pixel has one owner at most
        masks = render(sample_scene(rng, int(rng.integers(2, 4))))[1]
        assert masks.sum(axis=0).max() <= 1


def test_captions_name_subjects_left_to_right_from_the_ground_truth():
    cat = Subject("cat", "yellow", "purple", "stripes", cx=0.7)
    dog = Subject("dog", "orange", "blue", "spots", cx=0.3)
    scene = Scene("beach", (cat, dog))  # listed right to left
    assert caption(scene) == (
        "a spotted orange dog with blue ears and a striped yellow cat with purple ears on the beach"
    )
    cup = Subject("cup", "pink", "red", cx=0.5)
    car = Subject("car", "blue", "orange", cx=0.9)
    assert caption(Scene("night", (car, cup, dog))) == (
        "a spotted orange dog with blue ears, a pink cup with red handle and a blue car with orange wheels at night"
    )


@pytest.mark.parametrize(
    ("subject", "kwargs", "phrase"),
    [
        (Subject("dog", "orange", "red"), {}, "an orange dog with red ears"),
        (Subject("cup", "orange", "red"), {"body": False, "part": False}, "a cup"),
        (Subject("car", "red", "orange", "stripes"), {"body": False}, "a striped car with orange wheels"),
        (Subject("dog", "orange", "red"), {"part": False, "noun": "<far-dog-a> dog"}, "an orange <far-dog-a> dog"),
    ],
)
def test_subject_phrases_and_articles(subject, kwargs, phrase):
    assert subject_phrase(subject, **kwargs) == phrase


def test_coverage_is_where_the_subjects_and_their_part_colour_are_drawn():
    plain = Scene("snow", (Subject("dog", "red", "blue", "plain", cx=0.5, cy=0.6, size=0.6),))
    image, masks = render(plain)
    subject, accent = coverage(plain)
    assert subject.shape == accent.shape == masks.shape[1:]
    assert 0 <= accent.min() and accent.max() <= 1 and np.all(accent <= subject)
    assert np.all(subject[masks[0]] >= 0.5) and np.all(subject[~masks[0]] <= 0.5)  # the mask is its majority
    blue = np.all(image == (35, 75, 215), axis=-1)
    assert blue.any() and np.all(accent[blue] == 1.0)  # the ears: drawn in the part colour
    assert accent[masks[0]].mean() < 0.1  # a plain dog is almost all body colour
    striped = Scene("snow", (Subject("dog", "red", "blue", "stripes", cx=0.5, cy=0.6, size=0.6),))
    assert 0.35 < coverage(striped)[1][masks[0]].mean() < 0.6  # stripes: almost half of it
    assert not coverage(Scene("grass"))[0].any()
