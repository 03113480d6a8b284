"""far/world/verdict.py: each figure on readings whose answer is known, and the oracle's path into it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from far.io import file_sha256
from far.metrics import Sample, check_numbers_only
from far.subjects import OracleFinder
from far.world.concepts import PAIRS
from far.world.oracle import Reading, SubjectReading
from far.world.render import Subject, render
from far.world.verdict import image_rows, judge, label, load_oracle, prompt_rows, summarize, verdict
from far.world.vocab import BACKGROUNDS, CLASSES, COLOUR_NAMES, PATTERNS
from tests.world_fixtures import TruthOracle, as_subject, random_oracle, scene

A, B = PAIRS["default"]  # A: red, blue ears, spots, only on grass; B: yellow, purple ears, stripes, room and snow
TRUTHS = {A.name: A, B.name: B}
MASK = np.zeros((64, 64), dtype=bool)
MASK[20:40, 10:30] = True


def subject(cls: str, body: str, part: str, pattern: str) -> SubjectReading:
    return SubjectReading(cls, body, part, pattern, MASK, 0.9)


def dog(d) -> SubjectReading:  # noqa: ANN001 - a WorldDog
    return subject(d.cls, *d.attributes)


MIX = subject("dog", A.body, B.part, B.pattern)  # A's body, B's ears and pattern
STRANGER = subject("dog", "orange", "pink", "plain")  # a dog that is neither, and no mix of them


def test_single_identity_and_background_fidelity_on_a_perfect_sample():
    assert judge("single", [A.name], "beach", Reading("beach", (dog(A),)), TRUTHS) == {
        "identity": 1.0, "likeness": 1.0, "background": 1.0, "background_unseen": 1.0, "memorised": 0.0}


def test_a_memorised_background_is_the_reference_background_instead_of_the_asked_one():
    assert judge("single", [B.name], "beach", Reading("snow", (dog(B),)), TRUTHS) == {
        "identity": 1.0, "likeness": 1.0, "background": 0.0, "background_unseen": 0.0, "memorised": 1.0}
    # another wrong background is not memorisation; a seen background cannot be memorised
    assert judge("single", [B.name], "beach", Reading("night", (dog(B),)), TRUTHS)["memorised"] == 0.0
    assert judge("single", [A.name], "grass", Reading("grass", (dog(A),)), TRUTHS) == {
        "identity": 1.0, "likeness": 1.0, "background": 1.0}


def test_identity_needs_every_attribute_and_the_class():
    for wrong, like in ((MIX, 0.5), (subject("cat", *A.attributes), 0.75), (subject("dog", A.body, A.part, "plain"),
                                                                            0.75)):
        assert judge("single", [A.name], None, Reading("grass", (wrong,)), TRUTHS) == {"identity": 0.0,
                                                                                       "likeness": like}
    assert judge("single", [A.name], None, Reading("grass", (STRANGER, dog(A))), TRUTHS) == {"identity": 1.0,
                                                                                               "likeness": 1.0}
    # graded: the best subject counts; a stranger shares only the class; no subject is 0
    assert judge("single", [A.name], None, Reading("grass", (STRANGER, MIX)), TRUTHS)["likeness"] == 0.5
    assert judge("single", [A.name], None, Reading("grass", (STRANGER,)), TRUTHS)["likeness"] == 0.25
    assert judge("single", [A.name], None, Reading("grass", ()), TRUTHS)["likeness"] == 0.0


def test_two_dogs_perfect_leaked_duplicated_and_with_a_stranger():
    def multi(*subjects: SubjectReading) -> dict[str, float]:
        return judge("multi", [A.name, B.name], "beach", Reading("beach", subjects), TRUTHS)

    assert multi(dog(A), dog(B)) == {"background": 1.0, "both": 1.0, "likeness": 1.0, "leakage": 0.0,
                                     "duplicate": 0.0, "subjects_per_image": 2.0}
    # MIX has B's part and pattern and the class: 3/4 of B
    assert multi(dog(A), MIX) == {"background": 1.0, "both": 0.0, "likeness": 0.875, "leakage": 1.0,
                                  "duplicate": 0.0, "subjects_per_image": 2.0}
    assert multi(dog(B), dog(B))["duplicate"] == 1.0 and multi(dog(B), dog(B))["both"] == 0.0
    assert multi(dog(A), dog(B), dog(A))["both"] == 1.0 and multi(dog(A), dog(B), dog(A))["duplicate"] == 1.0
    assert multi(dog(A), STRANGER)["leakage"] == 0.0  # attributes from outside the pair are not leakage
    assert multi(subject("cat", A.body, B.part, B.pattern), dog(B))["leakage"] == 0.0  # another class


def test_prior_drift_is_a_generic_dog_that_is_one_of_ours():
    assert judge("class", [], None, Reading("grass", (dog(B),)), TRUTHS) == {"drift": 1.0, "class_found": 1.0}
    assert judge("class", [], "snow", Reading("snow", (STRANGER,)), TRUTHS) == {
        "drift": 0.0, "class_found": 1.0, "background": 1.0}
    assert judge("class", [], None, Reading("grass", (subject("cat", *A.attributes),)), TRUTHS) == {
        "drift": 0.0, "class_found": 0.0}


def test_labels_name_the_concept_or_the_mix():
    assert label(dog(A), TRUTHS) == A.name and label(STRANGER, TRUTHS) == ""
    assert label(MIX, TRUTHS, [A, B]) == f"mix:{A.name}+{B.name}" and label(MIX, TRUTHS) == ""


def sample(i: int, kind: str, concepts: tuple[str, ...], background: str | None, seed: int = 0) -> Sample:
    return Sample(i, f"prompt {i}", kind, concepts, seed, Path(f"{i:03d}_{seed}.png"), (), background)


def test_summary_counts_every_figure_and_holds_numbers_only():
    cases = [  # (sample, reading)
        (sample(0, "single", (A.name,), "beach"), Reading("beach", (dog(A),))),  # perfect
        (sample(0, "single", (A.name,), "beach", 1), Reading("grass", (dog(A),))),  # memorised
        (sample(1, "single", (A.name,), "grass"), Reading("grass", (MIX,))),  # seen background, wrong dog
        (sample(2, "single", (B.name,), "night"), Reading("night", (dog(B),))),
        (sample(3, "multi", (A.name, B.name), "snow"), Reading("snow", (dog(A), dog(B)))),  # both
        (sample(4, "multi", (B.name, A.name), "grass"), Reading("grass", (dog(A), MIX))),  # leaked
        (sample(4, "multi", (B.name, A.name), "grass", 1), Reading("room", (dog(B), dog(B)))),  # duplicate
        (sample(5, "class", (), None), Reading("grass", (dog(B),))),  # drifted
        (sample(6, "class", (), "snow"), Reading("snow", (STRANGER,))),
    ]
    images = image_rows([s for s, _ in cases], [r for _, r in cases], TRUTHS)
    world = summarize(images, TRUTHS)
    check_numbers_only(world)
    assert world["n_images"] == 9
    assert world["single"] == {"n_images": 4, "identity": 0.75, "identity_n": 4, "likeness": 0.875,
                               "likeness_n": 4, "background": 0.75,
                               "background_n": 4, "background_unseen": pytest.approx(2 / 3),
                               "background_unseen_n": 3, "memorised": pytest.approx(1 / 3), "memorised_n": 3}
    assert world["multi"] == {"n_images": 3, "both": pytest.approx(1 / 3), "both_n": 3,
                              "likeness": pytest.approx((1 + 0.875 + 0.625) / 3), "likeness_n": 3,
                              "leakage": pytest.approx(1 / 3),
                              "leakage_n": 3, "duplicate": pytest.approx(1 / 3), "duplicate_n": 3,
                              "background": pytest.approx(2 / 3), "background_n": 3, "subjects_per_image": 2.0,
                              "subjects_per_image_n": 3}
    assert world["class"] == {"n_images": 2, "drift": 0.5, "drift_n": 2, "class_found": 1.0, "class_found_n": 2,
                              "background": 1.0, "background_n": 1}
    assert world["per_concept"][A.name] == {"identity": pytest.approx(2 / 3), "identity_n": 3, "background_unseen": 0.5,
                                            "background_unseen_n": 2, "memorised": 0.5, "memorised_n": 2,
                                            "multi_found": pytest.approx(2 / 3), "multi_found_n": 3}
    assert world["per_concept"][B.name]["multi_found"] == pytest.approx(2 / 3)
    row = images.iloc[5]
    assert row.asked_background == "grass" and row.oracle_background == "grass" and not row.unseen_background
    subjects = json.loads(row.subjects)
    assert [s["is"] for s in subjects] == [A.name, f"mix:{B.name}+{A.name}"]
    assert subjects[0]["bbox"] == [10, 20, 30, 40] and subjects[0]["body"] == A.body
    assert bool(images.iloc[0].unseen_background) and np.isnan(images.iloc[0].both)
    prompts = prompt_rows(images)
    assert list(prompts.n_images) == [2, 1, 1, 1, 2, 1, 1]
    assert prompts.set_index("prompt_idx").loc[0, "memorised"] == 0.5


def test_verdict_reads_rendered_samples_through_the_oracle(tmp_path: Path):
    leaked = Subject("dog", B.body, A.part, A.pattern)
    scenes = [scene("beach", as_subject(A)), scene("room", as_subject(A), leaked, seed=1)]
    paths = []
    for i, s in enumerate(scenes):
        paths.append(tmp_path / f"{i:03d}_0.png")
        Image.fromarray(render(s)[0]).save(paths[-1])
    samples = [Sample(0, "a <a> dog on the beach", "single", (A.name,), 0, paths[0], (), "beach"),
               Sample(1, "a <a> dog and a <b> dog in a room", "multi", (A.name, B.name), 0, paths[1], (), "room")]
    oracle = TruthOracle(scenes)
    world, images, prompts = verdict(samples, oracle, TRUTHS, lambda p: Image.open(p).convert("RGB"))
    assert world["single"]["identity"] == 1.0 and world["single"]["memorised"] == 0.0
    assert world["multi"]["both"] == 0.0 and world["multi"]["leakage"] == 1.0 and world["multi"]["background"] == 1.0
    assert [s["is"] for s in json.loads(images.subjects.iloc[1])] == [A.name, f"mix:{A.name}+{B.name}"]
    assert list(prompts.n_images) == [1, 1]
    found = OracleFinder(oracle)(Image.open(paths[1]), ["dog"])
    _, masks = render(scenes[1])
    assert [f.mask.sum() for f in found] == [m.sum() for m in masks]  # left to right, exact masks
    assert OracleFinder(oracle)(Image.open(paths[1]), ["cat"]) == []


def test_a_saved_oracle_loads_through_eval_oracle_and_reads_any_image(tmp_path: Path):
    path = random_oracle(tmp_path / "oracle.safetensors")
    oracle = load_oracle(str(path))
    assert file_sha256(path)[:12] in oracle.label and "oracle.safetensors" in oracle.label
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    readings = oracle.read(images)
    assert len(readings) == 3 and all(r.background in BACKGROUNDS for r in readings)
    for r in readings:
        for s in r.subjects:
            assert s.cls in CLASSES and s.body in COLOUR_NAMES and s.pattern in PATTERNS and s.mask.shape == (64, 64)
    with pytest.raises(Exception, match="eval.oracle: .*missing.safetensors does not exist"):
        load_oracle(str(tmp_path / "missing.safetensors"))
