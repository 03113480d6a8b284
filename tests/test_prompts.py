"""far/prompts.py: DreamBench's prompt lists and the multi-concept templates."""

from __future__ import annotations

import pytest

from far.errors import InvalidInputError
from far.prompts import (
    DREAMBENCH_PROMPTS,
    MULTI_TEMPLATES,
    build_prompts,
    dreambench,
    evenly_spaced,
    parse_dreambench,
    world_prompts,
)

DOGS = [("dog", "<far-dog>", "dog"), ("dog3", "<far-dog3>", "dog")]


def test_shipped_file_is_dreambench_with_both_lists():
    bench = dreambench()
    assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
    assert bench.classes["dog3"] == "dog" and bench.classes["cat2"] == "cat" and bench.classes["teapot"] == "teapot"
    assert len(bench.classes) == 30
    assert "a {token} {class_word} wearing a santa hat" in bench.live_prompts
    assert "a {token} {class_word} on top of a mirror" in bench.object_prompts
    assert "a {token} {class_word} wearing a santa hat" not in bench.object_prompts
    assert (DREAMBENCH_PROMPTS.parent / "README.md").read_text().count("CC-BY-4.0") >= 1


def test_parse_names_the_file_when_a_list_is_missing():
    text = DREAMBENCH_PROMPTS.read_text()
    broken = text.split("Live Subject Prompts")[0]
    with pytest.raises(InvalidInputError, match="prompts.txt: no 'Live Subject Prompts'"):
        parse_dreambench(broken, "prompts.txt")


def test_live_subjects_get_live_prompts_objects_get_object_prompts():
    specs = build_prompts([*DOGS, ("bag", "<far-bag>", "backpack")], 25, 0, 2, ["dog", "cat"])
    dog = [s.prompt for s in specs if s.concepts == ("dog",)]
    bag = [s.prompt for s in specs if s.concepts == ("bag",)]
    assert len(dog) == len(bag) == 25
    assert "a <far-dog> dog wearing a santa hat" in dog and "a <far-bag> backpack on top of a mirror" in bag
    assert not any("hat" in p for p in bag)
    # with no live classes a dog is treated as an object
    objects = build_prompts(DOGS[:1], 25, 0, 2, [])
    assert "a <far-dog> dog on top of a mirror" in [s.prompt for s in objects]


def test_multi_concept_groups_name_every_concept():
    three = [*DOGS, ("cat", "<far-cat>", "cat")]
    specs = build_prompts(three, 1, 2, 3, ["dog", "cat"])
    multi = [s for s in specs if s.kind == "multi"]
    assert [s.concepts for s in multi] == [("dog", "dog3")] * 2 + [("dog", "cat")] * 2 + [("dog3", "cat")] * 2 + [
        ("dog", "dog3", "cat")] * 2
    for s in multi:
        for name, token, class_word in three:
            assert (f"a {token} {class_word}" in s.prompt) == (name in s.concepts)
    assert multi[-1].prompt.startswith("a <far-dog> dog, a <far-dog3> dog and a <far-cat> cat ")
    assert [s.index for s in specs] == list(range(len(specs)))  # stable file names
    assert specs == build_prompts(three, 1, 2, 3, ["dog", "cat"])
    pairs_only = build_prompts(three, 1, 2, 2, ["dog", "cat"])
    assert all(len(s.concepts) <= 2 for s in pairs_only)


def test_evenly_spaced_and_too_many():
    items = tuple("abcdefghij")
    assert evenly_spaced(items, 10, "k") == list(items)
    assert evenly_spaced(items, 2, "k") == ["c", "h"]
    assert len(set(evenly_spaced(items, 5, "k"))) == 5
    with pytest.raises(InvalidInputError, match="sample.multi_prompts: 11 is invalid"):
        build_prompts(DOGS, 1, len(MULTI_TEMPLATES) + 1, 2, ["dog"])
    with pytest.raises(InvalidInputError, match="sample.prompts_per_concept: 26"):
        build_prompts(DOGS, 26, 0, 2, ["dog"])


def test_world_prompts_every_background_both_orders_and_the_plain_class():
    dogs = [("a", "<wa>", "dog"), ("b", "<wb>", "dog")]
    specs = world_prompts(dogs, {"a": "dog", "b": "dog"})
    by_kind = {k: [s for s in specs if s.kind == k] for k in ("single", "multi", "class")}
    assert [len(v) for v in by_kind.values()] == [10, 10, 6] and [s.index for s in specs] == list(range(26))
    assert by_kind["single"][1].prompt == "a <wa> dog on the beach" and by_kind["single"][1].background == "beach"
    assert {s.background for s in by_kind["single"] if s.concepts == ("b",)} == {
        "grass", "beach", "snow", "room", "night"}
    assert by_kind["multi"][0].prompt == "a <wa> dog and a <wb> dog on the grass"
    assert by_kind["multi"][5].prompt == "a <wb> dog and a <wa> dog on the grass"
    assert by_kind["multi"][5].concepts == ("b", "a")
    assert [(s.prompt, s.background, s.concepts) for s in by_kind["class"][:2]] == [
        ("a dog", None, ()), ("a dog on the grass", "grass", ())]
    assert by_kind["class"][4].prompt == "a dog in a room"
    with pytest.raises(InvalidInputError, match="class_word 'dog' but its world.json says 'cat'"):
        world_prompts(dogs, {"a": "cat", "b": "dog"})


def test_world_tuning_prompts_share_no_prompt_with_the_evaluation_set():
    dogs = [("a", "<wa>", "dog"), ("b", "<wb>", "dog")]
    truths = {"a": "dog", "b": "dog"}
    tuning = world_prompts(dogs, truths, tuning=True)
    assert [(s.prompt, s.kind, s.concepts, s.background) for s in tuning] == [
        ("a <wa> dog", "single", ("a",), None), ("a <wb> dog", "single", ("b",), None),
        ("a <wa> dog and a <wb> dog", "multi", ("a", "b"), None),
        ("a <wb> dog and a <wa> dog", "multi", ("b", "a"), None)]
    assert not {s.prompt for s in tuning} & {s.prompt for s in world_prompts(dogs, truths)}
