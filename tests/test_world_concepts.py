"""far/world/concepts.py: the world dogs' concept folders, re-rendered byte for byte, and their truth files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from far.config import ConceptSpec
from far.errors import InvalidInputError
from far.images import load_folder
from far.world.concepts import PAIRS, TRUTH_FILE, WorldDog, read_truth, reference_scenes, world_truths, write_concept
from far.world.render import Scene, render
from tests.conftest import ROOT

DOGS = [dog for pair in PAIRS.values() for dog in pair]


@pytest.mark.parametrize("dog", DOGS, ids=[d.name for d in DOGS])
def test_committed_folders_are_what_the_renderer_makes(dog: WorldDog, tmp_path: Path):
    folder = write_concept(dog, tmp_path)
    shipped = ROOT / "data" / "concepts" / dog.name
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in shipped.iterdir())
    assert names == [*[f"{i:02d}{s}" for i in range(5) for s in (".png", "_mask.png")], TRUTH_FILE]
    for name in names:
        assert (folder / name).read_bytes() == (shipped / name).read_bytes(), name


@pytest.mark.parametrize("dog", DOGS, ids=[d.name for d in DOGS])
def test_each_reference_is_the_dog_alone_on_its_own_backgrounds_with_its_exact_mask(dog: WorldDog):
    folder = ROOT / "data" / "concepts" / dog.name
    truth = json.loads((folder / TRUTH_FILE).read_text())
    assert read_truth(folder) == dog
    assert {s["background"] for s in truth["scenes"]} == set(dog.backgrounds)
    for i, scene in enumerate(reference_scenes(dog)):
        assert Scene.from_dict(truth["scenes"][i]) == scene
        (subject,) = scene.subjects
        assert (subject.cls, *subject.attributes) == (dog.cls, *dog.attributes)
        mask = np.asarray(Image.open(folder / f"{i:02d}_mask.png"))
        assert set(np.unique(mask)) == {0, 255}
        np.testing.assert_array_equal(mask == 255, render(scene, 64)[1][0])
    assert len(load_folder(folder, exclude_suffix="_mask.png")) == 5  # world.json and masks are not references


def test_the_pairs_differ_in_every_attribute_and_keep_backgrounds_apart():
    for a, b in PAIRS.values():
        assert a.cls == b.cls and all(x != y for x, y in zip(a.attributes, b.attributes, strict=True))
        assert not set(a.backgrounds) & set(b.backgrounds)
    assert not {d.attributes for d in PAIRS["default"]} & {d.attributes for d in PAIRS["pair2"]}


def spec(folder: Path, name: str) -> ConceptSpec:
    return ConceptSpec(name=name, token=f"<{name}>", class_word="dog", images=folder)


def test_world_truths_all_or_none(tmp_path: Path):
    a, b = PAIRS["default"]
    world = [spec(write_concept(d, tmp_path), d.name) for d in (a, b)]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert world_truths(world) == {a.name: a, b.name: b}
    assert world_truths([spec(plain, "plain")]) == {}
    with pytest.raises(InvalidInputError, match="plain/world.json"):
        world_truths([*world, spec(plain, "plain")])
    with pytest.raises(InvalidInputError, match="plain/world.json"):
        world_truths([spec(plain, "plain")], required=True)
    (tmp_path / a.name / TRUTH_FILE).write_text('{"name": "x", "class": "dog", "body": "red", "part": "red"}')
    with pytest.raises(InvalidInputError, match="not a valid world concept truth"):
        read_truth(tmp_path / a.name)


@pytest.mark.parametrize(("config", "pair"), [("../params.yaml", "default"), ("world-pair2.yaml", "pair2")])
def test_world_configs_name_the_world_pairs(config: str, pair: str):
    from far.config import load_params

    cfg = load_params(ROOT / "configs" / config)
    assert [c.name for c in cfg.concepts.subjects] == [d.name for d in PAIRS[pair]]
    assert world_truths(cfg.concepts.subjects, required=True) == {d.name: d for d in PAIRS[pair]}
    assert (cfg.model.pretrained, cfg.model.resolution, cfg.segment.backend) == ("world", 64, "provided")
    assert (cfg.sample.prompt_set, cfg.eval.clip_model, cfg.eval.subject_finder, cfg.eval.world) == (
        "world", "world", "oracle", "auto")
