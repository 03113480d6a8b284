"""The world verdict inside far/metrics.py's evaluate: world prompts' samples in, the `world` block and tables out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from far import metrics
from far.config import ConceptsConfig, EvalConfig, SampleConfig, SegmentConfig
from far.errors import InvalidInputError
from far.prompts import prompts_for
from far.sample import Job, manifest_rows
from far.segment import segment_concepts
from far.world import verdict as verdict_module
from far.world.concepts import PAIRS
from far.world.render import render
from tests.conftest import ROOT
from tests.world_fixtures import TruthOracle, as_subject, random_oracle, scene

A, B = PAIRS["default"]
CONCEPTS = ConceptsConfig(subjects=[
    {"name": d.name, "token": f"<{d.name}>", "class_word": "dog", "images": ROOT / "data" / "concepts" / d.name}
    for d in (A, B)])
PROVIDED = SegmentConfig(backend="provided")


def pick(prompt: str):  # noqa: ANN201 - far.prompts.PromptSpec
    specs = {s.prompt: s for s in prompts_for(SampleConfig(prompt_set="world"), CONCEPTS)}
    return specs[prompt]


# Four world prompts and what each "generated" image shows (known scenes, rendered).
CASES = [
    (f"a <{A.name}> dog on the beach", scene("beach", as_subject(A))),  # right dog, unseen background: right
    (f"a <{B.name}> dog in a room", scene("snow", as_subject(B))),  # seen background asked, the other one came
    (f"a <{A.name}> dog and a <{B.name}> dog on the grass", scene("grass", as_subject(A), as_subject(B), seed=1)),
    ("a dog", scene("grass", as_subject(B), seed=2)),  # prior drift: the generic dog is ours
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("world-eval")
    segmented = root / "segmented"
    segment_concepts(CONCEPTS, PROVIDED, segmented)  # the ordinary segment stage on the world folders
    samples = root / "samples"
    (samples / "attn").mkdir(parents=True)
    jobs = [Job(pick(prompt), 0) for prompt, _ in CASES]
    for job, (_, sc) in zip(jobs, CASES, strict=True):
        Image.fromarray(render(sc)[0]).save(samples / f"{job.stem}.png")
        for name in job.spec.concepts:
            np.save(samples / "attn" / f"{job.stem}_{name}.npy", np.ones((8, 8), np.float32))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from far.sample import MANIFEST_SCHEMA

    pq.write_table(pa.Table.from_pylist(manifest_rows(jobs, CONCEPTS, samples), schema=MANIFEST_SCHEMA),
                   samples / "manifest.parquet")
    return samples, segmented


def test_world_prompts_reach_evaluate_with_kind_and_background(inputs, tmp_path: Path):
    samples, _ = inputs
    read = metrics.read_samples(samples, CONCEPTS)
    assert [(s.kind, s.concepts, s.background) for s in read] == [
        ("single", (A.name,), "beach"), ("single", (B.name,), "room"), ("multi", (A.name, B.name), "grass"),
        ("class", (), None)]


def test_the_oracle_judges_every_sample_into_the_world_block(inputs, tmp_path: Path, monkeypatch):
    samples, segmented = inputs
    monkeypatch.setattr(verdict_module, "load_oracle", lambda name: TruthOracle([sc for _, sc in CASES]))
    cfg = EvalConfig(subject_finder="oracle", batch_size=8)
    result, tables, run = metrics.evaluate(samples, segmented, CONCEPTS, cfg, tmp_path / "bb", segment=PROVIDED)
    world = result["world"]
    assert world["single"] == {"n_images": 2, "identity": 1.0, "identity_n": 2, "likeness": 1.0, "likeness_n": 2,
                               "background": 0.5,
                                    "background_n": 2, "background_unseen": 1.0, "background_unseen_n": 1,
                                    "memorised": 0.0, "memorised_n": 1}
    assert (world["multi"]["both"], world["multi"]["leakage"], world["multi"]["duplicate"]) == (1.0, 0.0, 0.0)
    assert world["class"]["drift"] == 1.0 and world["class"]["drift_n"] == 1
    assert run["backbones"]["oracle"] == "truth-oracle" and "oracle subjects" in run["backbones"]["subject_finder"]
    assert result["multi_concept"]["subjects_found"] == 1.0  # the oracle's two dogs, assigned to the concepts
    assert len(tables["world"]) == 4 and list(tables["world_prompts"].n_images) == [1, 1, 1, 1]
    per_image = tables["per_image"].set_index("kind")
    assert np.isnan(per_image.loc["class", "clip_i"]) and np.isfinite(per_image.loc["single", "clip_i"]).all()

    metrics.write_outputs(result, tables, tmp_path / "metrics.json", tmp_path / "eval", run)
    csv = pd.read_csv(tmp_path / "eval" / "world.csv")
    assert list(csv.oracle_background) == ["beach", "snow", "grass", "grass"] and list(csv.n_subjects) == [1, 1, 2, 1]
    assert (tmp_path / "eval" / "world_prompts.csv").is_file()


def test_a_random_oracle_from_its_file_runs_the_same_path(inputs, tmp_path: Path):
    samples, segmented = inputs
    oracle = random_oracle(tmp_path / "oracle.safetensors")
    cfg = EvalConfig(subject_finder="oracle", oracle=str(oracle), batch_size=8)
    result, tables, run = metrics.evaluate(samples, segmented, CONCEPTS, cfg, tmp_path / "bb", segment=PROVIDED)
    metrics.check_numbers_only(result)
    assert result["world"]["n_images"] == 4 and result["world"]["single"]["identity_n"] == 2
    assert "oracle.safetensors" in run["backbones"]["oracle"] in run["backbones"]["subject_finder"]


def test_eval_world_switch(tmp_path: Path):
    assert metrics.world_inputs(EvalConfig(world=False), CONCEPTS) == ({}, None)
    dreambench = ConceptsConfig(subjects=[{"name": "dog", "token": "<far-dog>", "class_word": "dog",
                                           "images": ROOT / "data" / "concepts" / "dog"}])
    assert metrics.world_inputs(EvalConfig(), dreambench) == ({}, None)  # auto: not a world concept
    with pytest.raises(InvalidInputError, match="dog/world.json"):
        metrics.world_inputs(EvalConfig(world=True), dreambench)
    with pytest.raises(InvalidInputError, match="eval.oracle: .*nothing.safetensors does not exist"):
        metrics.world_inputs(EvalConfig(oracle=str(tmp_path / "nothing.safetensors")), CONCEPTS)
