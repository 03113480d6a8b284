"""far/metrics.py formulas and inputs; far/identity.py leakage, assignment, regions, crops and verdicts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from far import identity
from far.config import load_params
from far.errors import InvalidInputError
from far.metrics import (
    EmbeddingCache,
    clip_prompt,
    clip_t,
    clipscore,
    cosine,
    mean_pairwise,
    read_references,
    read_samples,
)
from tests._eval_inputs import make_samples, make_segmented


# ------------------------------------------------------------------------------------------- formulas
def test_clip_t_is_raw_cosine_and_clipscore_clamps_at_zero() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, -5.0], [2.0, 0.0]])
    cos = clip_t(img, txt)
    torch.testing.assert_close(cos, torch.tensor([1 / math.sqrt(2), -1.0, 1.0]))
    torch.testing.assert_close(clipscore(cos), torch.tensor([100 / math.sqrt(2), 0.0, 100.0]))


def test_mean_pairwise_averages_cosines_over_all_references() -> None:
    gen = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    refs = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    torch.testing.assert_close(mean_pairwise(gen, refs), torch.tensor([0.0, 1 / 3]))
    assert cosine(gen, refs).shape == (2, 3)


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a <far-dog> dog on the beach", "a dog on the beach"),
    ("a <far-dog> dog and a <far-dog3> dog in the snow", "a dog and a dog in the snow"),
    ("a photo of <far-dog>", "a photo of dog"),  # a lone token becomes its class word
    ("a <far-dog> doghouse", "a dog doghouse"),  # "dog" must be a whole word to be the class word
    ("a dog on the beach", "a dog on the beach"),
])
def test_clip_prompt_removes_identifier_tokens(prompt: str, expected: str) -> None:
    assert clip_prompt(prompt, [("<far-dog>", "dog"), ("<far-dog3>", "dog")]) == expected


def test_embedding_cache_computes_each_key_once() -> None:
    calls: list[int] = []

    def embed(images: list[Image.Image]) -> torch.Tensor:
        calls.append(len(images))
        return torch.tensor([[float(im.size[0]), 1.0] for im in images])

    cache = EmbeddingCache(embed)
    load = lambda k: Image.new("RGB", (k, 1))  # noqa: E731
    first = cache.get([3, 4, 3], load)
    second = cache.get([4, 5], load)
    assert calls == [2, 1] and cache.computed == 3
    torch.testing.assert_close(first[:, 0], torch.tensor([3.0, 4.0, 3.0]))
    torch.testing.assert_close(second[:, 0], torch.tensor([4.0, 5.0]))


# ------------------------------------------------------------------------------------------- identity
def square_map(x0: int, y0: int, x1: int, y1: int, side: int = 8, value: float = 1.0) -> np.ndarray:
    m = np.zeros((side, side), np.float32)
    m[y0:y1, x0:x1] = value
    return m


def blob(cx: float, cy: float, sigma: float, side: int = 16, floor: float = 0.0) -> np.ndarray:
    """(side, side) Gaussian attention blob (peak 1) on a uniform floor, like a real token's map."""
    y, x = np.mgrid[0:side, 0:side]
    return (floor + np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))).astype(np.float32)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return identity.leakage({"a": a, "b": b})[("a", "b")]


def test_attn_leakage_identical_is_total_disjoint_is_none_uniform_is_worst() -> None:
    a, b = square_map(0, 0, 4, 8), square_map(4, 0, 8, 8)  # left half, right half
    assert overlap(a, b) == 0.0  # disjoint maps: no leakage
    dog = blob(4, 8, 2.5, floor=0.05)
    assert overlap(dog, dog.copy()) == pytest.approx(1.0)  # identical maps: total leakage
    assert overlap(dog, 3 * dog) == pytest.approx(1.0)  # the maps' scale does not matter
    uniform = np.ones((16, 16), np.float32)
    assert overlap(uniform, uniform) == pytest.approx(1.0)  # the degenerate image is the worst case ...
    assert overlap(uniform, np.zeros((16, 16))) == pytest.approx(1.0)  # ... and a map with no mass reads as uniform
    assert overlap(uniform, dog) < 1.0  # a localised map is told apart from a uniform one
    three = identity.leakage({"x": a, "y": b, "z": a.copy()})  # every unordered pair, in the maps' order
    assert three == {("x", "y"): 0.0, ("x", "z"): pytest.approx(1.0), ("y", "z"): 0.0}
    with pytest.raises(InvalidInputError, match="differ in shape"):
        identity.leakage({"a": a, "b": np.ones((4, 4))})


def test_attn_leakage_ranks_the_leaking_model_worse() -> None:
    # The review's case: model L draws both tokens on one subject (total leakage), model S keeps two diffuse
    # maps on separate subjects. The old share-in-region score ranked L better (0.10 against 0.2).
    floor = 0.05
    leaking = overlap(blob(4, 8, 2.0, floor=floor), blob(4, 8, 2.0, floor=floor))
    separated = overlap(blob(3, 8, 3.5, floor=floor), blob(12, 8, 3.5, floor=floor))
    assert leaking > separated + 0.3
    # And graded: B's token attending more and more on A's subject reads as more and more leakage.
    own_a, own_b = blob(3, 8, 2.0, floor=floor), blob(12, 8, 2.0, floor=floor)
    scores = [overlap(own_a, (1 - t) * own_b + t * own_a) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert scores == sorted(scores) and scores[-1] == pytest.approx(1.0)
    assert 0.3 < scores[0] < 0.4  # separate subjects: the shared floor (a third of each map's mass) is the overlap


def test_assign_is_hungarian_not_greedy() -> None:
    # Both instances look most like `a`; greedy argmax would give `a` two instances and `b` none.
    sims = np.array([[0.9, 0.8],   # instance 0: a 0.9, b 0.8
                     [0.7, 0.2]])  # instance 1: a 0.7, b 0.2
    assert identity.assign(["a", "b"], sims) == {"a": 1, "b": 0}  # total 1.5, against 1.1 the other way
    assert identity.assign(["a", "b"], np.array([[0.3, 0.6]])) == {"a": None, "b": 0}  # one instance found
    assert identity.assign(["a", "b"], np.zeros((0, 2))) == {"a": None, "b": None}
    three = identity.assign(["a", "b"], np.array([[0.1, 0.1], [0.9, 0.2], [0.2, 0.8]]))  # a spurious third blob
    assert three == {"a": 1, "b": 2}


def test_segment_regions_split_the_foreground_by_the_strongest_map() -> None:
    size = (16, 8)  # (W, H)
    a = identity.upsample(square_map(0, 0, 3, 8, side=8), size)  # attends the left part
    b = identity.upsample(square_map(5, 0, 8, 8, side=8), size)  # attends the right part
    assert a.shape == (8, 16) and a.max() == pytest.approx(1.0)
    fg = np.zeros((8, 16), bool)
    fg[2:6, 1:15] = True
    regions = identity.segment_regions({"a": a, "b": b}, fg)
    assert not (regions["a"] & regions["b"]).any() and not (regions["a"] & ~fg).any()
    assert regions["a"][:, :8].sum() > 0 and regions["a"][:, 8:].sum() == 0  # left half of the foreground
    assert regions["b"][:, 8:].sum() > 0 and regions["b"][:, :8].sum() == 0
    assert identity.region_bbox(regions["a"], a, size, 0.0) == (1, 2, int(regions["a"].nonzero()[1].max()) + 1, 6)
    empty = identity.segment_regions({"a": a, "b": np.zeros_like(b)}, fg)
    assert not empty["b"].any() and empty["a"].sum() < fg.sum()  # a keeps only where its map is > 0


def test_subject_bbox_takes_the_heaviest_blob_and_scales_to_pixels() -> None:
    m = square_map(1, 2, 3, 4) + square_map(5, 5, 8, 8, value=0.9)  # a 2x2 blob and a heavier 3x3 blob
    assert identity.subject_bbox(m, 0.5, (80, 160), padding=0.0) == (50, 100, 80, 160)
    assert identity.subject_bbox(m, 0.95, (80, 160), padding=0.0) == (10, 40, 30, 80)  # only the 1.0 blob
    assert identity.subject_bbox(m, 0.5, (80, 160), padding=0.5) == (35, 70, 80, 160)  # clamped at the edge
    assert identity.subject_bbox(np.zeros((8, 8)), 0.5, (80, 160), 0.1) is None


def test_judge_identity_mixing_and_margin() -> None:
    ok = identity.judge("a", True, (0, 0, 1, 1), {"a": 0.8, "b": 0.4, "c": 0.6})
    assert ok.correct and ok.mixing == pytest.approx(0.75) and ok.margin == pytest.approx(0.2)
    bad = identity.judge("b", True, (0, 0, 1, 1), {"a": 0.8, "b": 0.4, "c": 0.6})
    assert not bad.correct and bad.mixing == pytest.approx(2.0) and bad.margin == pytest.approx(-0.4)
    missing = identity.judge("a", False, None, {"a": 0.9, "b": 0.1})
    assert not missing.correct and math.isnan(missing.mixing)


def test_load_map_normalises_and_rejects_bad_files(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", np.array([[0, 2], [1, 0]], np.float32))
    np.testing.assert_allclose(identity.load_map(tmp_path / "m.npy"), [[0, 1], [0.5, 0]])
    np.save(tmp_path / "h.npy", np.array([[0, 2], [1, 0]], np.float16))  # lossy: an older sample stage's map
    with pytest.raises(InvalidInputError, match=r"h\.npy: attention map is float16, expected float32"):
        identity.load_map(tmp_path / "h.npy")
    np.save(tmp_path / "v.npy", np.ones(4, np.float32))
    with pytest.raises(InvalidInputError, match=r"v\.npy: expected"):
        identity.load_map(tmp_path / "v.npy")
    (tmp_path / "x.npy").write_text("nope")
    with pytest.raises(InvalidInputError, match=r"x\.npy: not a readable"):
        identity.load_map(tmp_path / "x.npy")


# ------------------------------------------------------------------------------------------- inputs
@pytest.fixture
def concepts(params_file):
    return load_params(params_file()).concepts


def test_read_samples_and_references_follow_the_contracts(tmp_path: Path, concepts) -> None:
    samples = read_samples(make_samples(tmp_path / "samples", seeds=(0,)), concepts)
    assert [s.kind for s in samples] == ["single", "single", "multi"]
    assert samples[2].concepts == ("dog", "dog3") and all(p.is_file() for p in samples[2].attention)
    refs = read_references(make_segmented(tmp_path / "seg", n=2), concepts)
    assert {c: len(r) for c, r in refs.items()} == {"dog": 2, "dog3": 2}
    assert refs["dog"][0].bbox[2] > refs["dog"][0].bbox[0]


def test_bad_manifests_name_the_file_and_problem(tmp_path: Path, concepts) -> None:
    with pytest.raises(InvalidInputError, match="sample manifest not found"):
        read_samples(tmp_path, concepts)
    samples = make_samples(tmp_path / "samples", seeds=(0,))
    (samples / "001_0.png").unlink()
    with pytest.raises(InvalidInputError, match=r"row 1: file .*001_0\.png does not exist"):
        read_samples(samples, concepts)
    df = pd.read_parquet(samples / "manifest.parquet")
    df.loc[0, "kind"] = "multi"
    df.drop(columns=["seed"]).to_parquet(samples / "manifest.parquet")
    with pytest.raises(InvalidInputError, match=r"missing columns \['seed'\]"):
        read_samples(samples, concepts)
    df.to_parquet(samples / "manifest.parquet")
    with pytest.raises(InvalidInputError, match="row 0: kind 'multi' does not fit 1 concept"):
        read_samples(samples, concepts)
    (samples / "manifest.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(InvalidInputError, match=r"manifest\.parquet: corrupt sample manifest, not a readable Parquet"):
        read_samples(samples, concepts)
    seg = make_segmented(tmp_path / "seg", n=1)
    refs = pd.read_parquet(seg / "manifest.parquet")
    refs[refs.concept == "dog"].to_parquet(seg / "manifest.parquet")
    with pytest.raises(InvalidInputError, match=r"no reference images for concepts \['dog3'\]"):
        read_references(seg, concepts)
