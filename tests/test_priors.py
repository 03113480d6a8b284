"""far/priors.py and the `priors` stage, with the real (tiny, random) diffusers base model."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from far.config import ConceptsConfig, ConceptSpec, PriorsConfig, TinyModelConfig, load_params
from far.models import load_base_pipeline, prepare_base_model
from far.priors import class_words, generate, prior_seed, prior_specs
from far.segment import Segmenter
from tests.conftest import ROOT, run


def concepts(*class_names: str) -> ConceptsConfig:
    return ConceptsConfig(subjects=[
        ConceptSpec(name=f"c{i}", token=f"<c{i}>", class_word=word, images=ROOT / "data/concepts/dog")
        for i, word in enumerate(class_names)
    ])


@pytest.fixture(scope="module")
def tiny_pipe():
    from far.models import build_tiny_pipeline

    pipe = build_tiny_pipeline(TinyModelConfig(), resolution=64, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_specs_count_per_distinct_class_word_and_stable_seeds():
    cfg = PriorsConfig(per_class=3, seed=7)
    specs = prior_specs(concepts("dog", "dog", "cat"), cfg)
    assert class_words(concepts("dog", "dog", "cat")) == ["dog", "cat"]
    assert [(w, i) for w, i, _, _ in specs] == [("dog", 0), ("dog", 1), ("dog", 2), ("cat", 0), ("cat", 1), ("cat", 2)]
    assert specs[0][2] == "a photo of a dog" and specs[3][2] == "a photo of a cat"
    assert len({s[3] for s in specs}) == 6  # every image its own seed
    # a dog prior does not change when another class word is configured (or the order changes)
    assert prior_specs(concepts("cat", "dog"), cfg)[3:] == specs[:3]
    assert prior_seed(7, "dog", 0) != prior_seed(8, "dog", 0)


def test_images_do_not_depend_on_batch_size(tiny_pipe):
    prompts, seeds = ["a photo of a dog"] * 3, [prior_seed(1, "dog", i) for i in range(3)]
    one = list(generate(tiny_pipe, prompts, seeds, PriorsConfig(batch_size=1, num_inference_steps=2)))
    three = list(generate(tiny_pipe, prompts, seeds, PriorsConfig(batch_size=3, num_inference_steps=2)))
    assert len(one) == len(three) == 3 and one[0].shape == (64, 64, 3) and one[0].dtype == np.uint8
    for a, b in zip(one, three, strict=True):  # same noise per image; only float summation order may differ
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert np.abs(one[0].astype(int) - one[1].astype(int)).mean() > 10  # different seeds, different images


def test_images_are_made_at_the_resolution_asked_for(tiny_pipe):
    """model.resolution reaches the pipeline as height and width (the model's native size here is 64)."""
    [image] = generate(tiny_pipe, ["a photo of a dog"], [0], PriorsConfig(num_inference_steps=1), resolution=128)
    assert image.shape == (128, 128, 3)


@pytest.mark.slow
def test_priors_stage_end_to_end(tmp_path, params_file):
    def edit(p):
        p["model"]["resolution"] = 64
        p["priors"].update(per_class=3, batch_size=2, num_inference_steps=2)

    params = params_file(edit)
    base, out = tmp_path / "base", tmp_path / "priors"
    prepare_base_model(load_params(params).model, base)  # in-process: one subprocess less
    proc = run([sys.executable, "-m", "stages.priors", "--base", str(base), "--out", str(out), "--params",
                str(params)], cwd=ROOT)
    assert "priors: 3 images of ['dog']" in proc.stdout
    manifest = pq.read_table(out / "manifest.parquet")
    seg_columns = ["concept", "class_word", "source", "image", "mask", "cutout", "width", "height",
                   "area_fraction", "bbox", "backend", "quality"]
    assert manifest.column_names == seg_columns
    rows = manifest.to_pylist()
    assert [r["image"] for r in rows] == ["dog/000.png", "dog/001.png", "dog/002.png"]
    backend = Segmenter(load_params(params).segment).label  # the references' backend (auto: u2netp if installed)
    for i, r in enumerate(rows):
        assert r["concept"] == "" and r["class_word"] == "dog" and r["backend"] == backend
        assert r["source"] == f"a photo of a dog|seed={prior_seed(1, 'dog', i)}"
        rgb = cv2.imread(str(out / r["image"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / r["mask"]), cv2.IMREAD_UNCHANGED)
        cutout = cv2.imread(str(out / r["cutout"]), cv2.IMREAD_UNCHANGED)
        assert rgb.shape == (64, 64, 3) and mask.shape == (64, 64) and cutout.shape == (64, 64, 4)
        assert set(np.unique(mask)) <= {0, 255} and np.array_equal(cutout[..., 3], mask)
        assert r["area_fraction"] == pytest.approx((mask > 0).mean())
    # the stage's images are the model's: the same seed in-process gives the same picture
    pipe = load_base_pipeline(base)
    pipe.set_progress_bar_config(disable=True)
    cfg = load_params(params).priors
    again = next(generate(pipe, ["a photo of a dog"], [prior_seed(1, "dog", 1)], cfg))
    stored = cv2.cvtColor(cv2.imread(str(out / "dog/001.png")), cv2.COLOR_BGR2RGB)
    assert np.abs(again.astype(int) - stored.astype(int)).max() <= 2


def test_priors_stage_without_base_model_fails_clearly(tmp_path, params_file):
    proc = run([sys.executable, "-m", "stages.priors", "--base", str(tmp_path / "nobase"), "--out",
                str(tmp_path / "priors"), "--params", str(params_file())], cwd=ROOT, check=False)
    assert proc.returncode == 2 and "nobase: no base model here (run the `base_model` stage)" in proc.stderr
    assert not (tmp_path / "priors").exists()


def test_zero_priors_is_a_clear_error(tiny_pipe, tmp_path):
    from far.config import SegmentConfig
    from far.errors import InvalidInputError
    from far.priors import write_priors

    with pytest.raises(InvalidInputError, match="priors.per_class: 0"):
        write_priors(tiny_pipe, tmp_path / "p", concepts("dog"), PriorsConfig(per_class=0), SegmentConfig())
    assert not (tmp_path / "p").exists()
