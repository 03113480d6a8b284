"""far/fusion.py, far/fusion_inputs.py, far/composite.py and the `fuse` stage, on the shipped real photos."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from far.composite import Layer, composite, feathered_alpha, place_layers
from far.config import ConceptsConfig, ConceptSpec, FusionConfig
from far.dataset import decode_image, decode_mask, iter_rows
from far.errors import InvalidInputError
from far.fusion import example_seed, fuse, plan, write_preview
from tests.conftest import ROOT, run

SIDE = 128  # model.resolution for these tests: small and fast, still a multiple of 64


def concepts_config() -> ConceptsConfig:
    return ConceptsConfig(subjects=[
        ConceptSpec(name="dog", token="<far-dog>", class_word="dog", images=ROOT / "data/concepts/dog"),
        ConceptSpec(name="dog3", token="<far-dog3>", class_word="dog", images=ROOT / "data/concepts/dog3"),
    ])


def small_cfg(**update) -> FusionConfig:
    base = {"num_single": 6, "num_multi": 10, "row_group_size": 8, "preview": 6, "workers": 0}
    return FusionConfig.model_validate(base | update)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """The shipped concepts segmented by the segment stage's code, and a priors folder in the priors layout
    (real photos standing in for generated ones, segmented the same way) - no diffusion model needed here."""
    from far.config import SegmentConfig
    from far.images import load_rgb
    from far.segment import Segmenter, manifest_row, save_subject, segment_concepts, write_manifest

    root = tmp_path_factory.mktemp("fusion_inputs")
    seg_cfg = SegmentConfig()
    segment_concepts(concepts_config(), seg_cfg, root / "segmented")
    priors = root / "priors"
    segmenter, rows = Segmenter(seg_cfg), []
    for i, src in enumerate([ROOT / "data/concepts/dog/02.jpg", ROOT / "data/concepts/dog3/00.jpg"]):
        rgb = np.ascontiguousarray(load_rgb(src)[:, ::-1])  # mirrored: not pixel-identical to a reference
        mask = segmenter(rgb)
        rel = save_subject(priors, f"dog/{i:03d}", rgb, mask)
        rows.append(manifest_row("", "dog", f"a photo of a dog|seed={i}", rel, mask, "grabcut", seg_cfg))
    write_manifest(rows, priors / "manifest.parquet")
    return root / "segmented", priors


def _build(inputs, out: Path, cfg: FusionConfig) -> dict:
    return fuse(inputs[0], inputs[1], out, concepts_config(), cfg, SIDE)


# ------------------------------------------------------------------------------------------ compositing
def _disc(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 / (h / 2) ** 2 + (xx - w / 2) ** 2 / (w / 2) ** 2 <= 1


def test_masks_are_exclusive_and_pixel_exact_under_occlusion():
    side = 64
    background = np.full((side, side, 3), 10, np.uint8)
    lower_mask, upper_mask = _disc(40, 40), _disc(30, 30)
    lower = Layer(np.full((40, 40, 3), 200, np.uint8), lower_mask, feathered_alpha(lower_mask, 2), x=5, y=5)
    upper = Layer(np.full((30, 30, 3), 90, np.uint8), upper_mask, feathered_alpha(upper_mask, 2), x=25, y=25)
    image, (m_low, m_up) = composite(background, [lower, upper])
    placed_low, placed_up = lower.canvas_mask(side), upper.canvas_mask(side)
    assert (placed_low & placed_up).sum() > 50  # the case really has an occlusion
    assert not (m_low & m_up).any()  # exclusive
    assert np.array_equal(m_up, placed_up)  # the top subject keeps its whole mask
    assert np.array_equal(m_low, placed_low & ~placed_up)  # the occluded part left the lower mask, exactly
    assert np.array_equal(m_low | m_up, placed_low | placed_up)
    outside = ~(placed_low | placed_up)
    assert (image[outside] == 10).all()  # feathering never paints outside the masks
    core_up = cv2.erode(m_up.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert core_up.any() and (image[core_up] == 90).all()  # the top subject is opaque inside


def test_feathered_alpha_is_soft_at_the_edge_and_zero_outside():
    mask = _disc(60, 60)
    alpha = feathered_alpha(mask, 4)
    assert alpha.dtype == np.float32 and alpha.max() == pytest.approx(1.0)
    assert (alpha[~mask] == 0).all()
    edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert alpha[edge].max() < 0.5  # the mask boundary is faded, not a hard seam
    assert np.array_equal(feathered_alpha(mask, 0), mask.astype(np.float32))


def test_placement_keeps_occlusion_within_max_overlap():
    rng = np.random.default_rng(0)
    for _ in range(20):
        layers = [Layer(np.zeros((24, 24, 3), np.uint8), _disc(24, 24), np.ones((24, 24), np.float32))
                  for _ in range(3)]
        occluded = place_layers(layers, 64, rng, max_overlap=0.2, tries=50)
        assert max(occluded) <= 0.2 and occluded[-1] == 0.0
        _, masks = composite(np.zeros((64, 64, 3), np.uint8), layers)
        for layer, m, occ in zip(layers, masks, occluded, strict=True):
            assert m.sum() == pytest.approx((1 - occ) * layer.mask.sum())


# --------------------------------------------------------------------------------------- training set
def test_training_set_rows_follow_params_and_contract(inputs, tmp_path):
    cfg = small_cfg()
    summary = _build(inputs, tmp_path / "fusion", cfg)
    path = tmp_path / "fusion" / "train.parquet"
    rows = list(iter_rows(path))
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("reference", "single", "fusion", "prior")}
    assert {k: len(v) for k, v in kinds.items()} == {"reference": 10, "single": 6, "fusion": 10, "prior": 2}
    assert summary["kinds"] == {k: len(v) for k, v in kinds.items()}
    assert pq.ParquetFile(path).num_row_groups == math.ceil(len(rows) / 8)
    assert {r["kind"] for r in rows[:8]} != {rows[0]["kind"]}  # row groups mix kinds (seeded shuffle)
    tokens = {"dog": "<far-dog>", "dog3": "<far-dog3>"}
    for r in rows:
        image = decode_image(r["image"])
        assert image.shape == (SIDE, SIDE, 3) and (r["width"], r["height"]) == (SIDE, SIDE)
        assert len(r["masks"]) == len(r["concepts"]) == len(r["class_words"]) >= 1  # the photo priors all have masks
        raw = [cv2.imdecode(np.frombuffer(m, np.uint8), cv2.IMREAD_UNCHANGED) for m in r["masks"]]
        assert all(m.shape == (SIDE, SIDE) and set(np.unique(m)) <= {0, 255} for m in raw)  # binary {0,255}
        masks = [decode_mask(m) for m in r["masks"]]
        assert all(m.any() for m in masks)
        assert r["seed"] == example_seed(cfg.seed, r["kind"], int(r["id"].split("-")[1]))
        augment = json.loads(r["augment"])
        assert r["sources"]
        if r["kind"] == "prior":
            assert r["concepts"] == [""] and r["class_words"] == ["dog"] and r["prompt"] == "a photo of a dog"
            continue
        for name in r["concepts"]:  # every concept named by its token and class, in order
            assert f"a {tokens[name]} dog" in r["prompt"]
        positions = [r["prompt"].index(tokens[n] + " ") for n in r["concepts"]]
        assert positions == sorted(positions)
        if r["kind"] in ("single", "fusion"):
            assert r["sources"][-1].startswith(("plate:", "background:"))
            assert len(augment["subjects"]) == len(r["concepts"])
            assert {"scale", "flip", "x", "y", "z", "occluded"} <= set(augment["subjects"][0])
    for r in kinds["single"]:
        assert len(r["concepts"]) == 1
    for r in kinds["fusion"]:
        assert len(set(r["concepts"])) == len(r["concepts"]) >= 2
        masks = [decode_mask(m) for m in r["masks"]]
        assert not np.logical_and(*masks[:2]).any()  # exclusive under occlusion
        assert all(s["occluded"] <= cfg.max_overlap + 1e-9 or s["z"] < len(masks) - 1
                   for s in json.loads(r["augment"])["subjects"])
    assert (tmp_path / "fusion" / "preview.png").is_file() and (tmp_path / "fusion" / "summary.json").is_file()


def test_kind_mix_comes_from_params(inputs, tmp_path):
    cfg = small_cfg(include_references=False, include_priors=False, num_single=3, num_multi=0,
                    backgrounds={"reference": 0.0, "prior": 0.0, "plate": 1.0})
    summary = fuse(inputs[0], None, tmp_path / "f", concepts_config(), cfg, SIDE)  # priors not needed at all
    assert summary["kinds"] == {"reference": 0, "single": 3, "fusion": 0, "prior": 0}
    assert all(r["sources"][-1].startswith("plate:") for r in iter_rows(tmp_path / "f" / "train.parquet"))


def test_same_params_give_byte_identical_parquet_whatever_the_workers(inputs, tmp_path):
    digests = {}
    for name, workers in (("a", 0), ("b", 2), ("c", 2)):
        _build(inputs, tmp_path / name, small_cfg(workers=workers))
        digests[name] = hashlib.sha256((tmp_path / name / "train.parquet").read_bytes()).hexdigest()
    assert digests["a"] == digests["b"] == digests["c"]
    _build(inputs, tmp_path / "d", small_cfg(seed=3))
    assert hashlib.sha256((tmp_path / "d" / "train.parquet").read_bytes()).hexdigest() != digests["a"]


def test_more_singles_leave_the_other_examples_unchanged(inputs, tmp_path):
    _build(inputs, tmp_path / "a", small_cfg(num_single=2, num_multi=3))
    _build(inputs, tmp_path / "b", small_cfg(num_single=5, num_multi=3))
    a = {r["id"]: r["image"] for r in iter_rows(tmp_path / "a" / "train.parquet")}
    b = {r["id"]: r["image"] for r in iter_rows(tmp_path / "b" / "train.parquet")}
    assert len(b) == len(a) + 3 and all(b[i] == a[i] for i in a)


def test_plan_order_is_seeded_and_complete():
    cfg = small_cfg()
    specs = plan(cfg, n_references=4, n_priors=2)
    assert specs == plan(cfg, 4, 2) and specs != plan(small_cfg(seed=5), 4, 2)
    assert sorted((k, j) for k, j, _ in specs) == sorted(
        [("reference", j) for j in range(4)] + [("single", j) for j in range(6)]
        + [("fusion", j) for j in range(10)] + [("prior", j) for j in range(2)])


def test_preview_outlines_each_concept_in_its_colour(inputs, tmp_path):
    _build(inputs, tmp_path / "f", small_cfg())
    shown = write_preview(tmp_path / "f" / "train.parquet", 4, tmp_path / "p.png", ["dog", "dog3"], tile=96)
    grid = cv2.cvtColor(cv2.imread(str(tmp_path / "p.png")), cv2.COLOR_BGR2RGB)
    assert shown == 4 and grid.shape == (2 * 96, 2 * 96, 3)
    for colour in ((255, 64, 64), (64, 160, 255)):  # dog red, dog3 blue
        assert (grid == colour).all(axis=2).sum() > 20


# ------------------------------------------------------------------------------------------- bad input
def _copy_inputs(inputs, dest: Path) -> tuple[Path, Path]:
    import shutil

    shutil.copytree(inputs[0], dest / "segmented")
    shutil.copytree(inputs[1], dest / "priors")
    return dest / "segmented", dest / "priors"


def test_missing_or_corrupt_manifest_is_named(inputs, tmp_path):
    seg, pri = _copy_inputs(inputs, tmp_path)
    with pytest.raises(InvalidInputError, match=r"nowhere/manifest\.parquet: segmented manifest not found"):
        fuse(tmp_path / "nowhere", pri, tmp_path / "out", concepts_config(), small_cfg(), SIDE)
    (pri / "manifest.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InvalidInputError, match=r"priors/manifest\.parquet: corrupt priors manifest"):
        fuse(seg, pri, tmp_path / "out", concepts_config(), small_cfg(), SIDE)
    assert not (tmp_path / "out").exists()


def test_mask_without_foreground_is_named_and_old_output_survives(inputs, tmp_path):
    seg, pri = _copy_inputs(inputs, tmp_path)
    out = tmp_path / "out"
    _build((seg, pri), out, small_cfg(num_single=1, num_multi=2))
    before = (out / "train.parquet").read_bytes()
    mask = seg / "dog3" / "02_mask.png"
    cv2.imwrite(str(mask), np.zeros(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE).shape, np.uint8))
    with pytest.raises(InvalidInputError, match=r"dog3/02_mask\.png: mask has no foreground"):
        _build((seg, pri), out, small_cfg())
    assert (out / "train.parquet").read_bytes() == before  # untouched: no half-written output
    assert not list(tmp_path.glob(".out.tmp-*"))
    (seg / "dog" / "01.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(InvalidInputError, match=r"dog/01\.png: missing or not a readable image"):
        _build((seg, pri), out, small_cfg())


def test_prior_with_empty_mask_keeps_image_and_prompt_but_names_no_object(inputs, tmp_path):
    from far.segment import write_manifest

    seg, pri = _copy_inputs(inputs, tmp_path)
    rows = pq.read_table(pri / "manifest.parquet").to_pylist()
    rows[1]["quality"] = "empty"  # what segmentation says of the tiny model's noise-like priors
    cv2.imwrite(str(pri / rows[1]["mask"]), np.zeros((rows[1]["height"], rows[1]["width"]), np.uint8))
    write_manifest(rows, pri / "manifest.parquet")
    summary = _build((seg, pri), tmp_path / "out", small_cfg(num_single=0, num_multi=0, include_references=False))
    priors = {r["sources"][0]: r for r in iter_rows(tmp_path / "out" / "train.parquet")}
    assert summary["kinds"]["prior"] == 2 and summary["priors_without_mask"] == ["priors/dog/001.png (empty mask)"]
    empty, ok = priors["priors/dog/001.png"], priors["priors/dog/000.png"]
    assert empty["prompt"] == "a photo of a dog" and empty["concepts"] == empty["masks"] == empty["class_words"] == []
    assert ok["concepts"] == [""] and ok["class_words"] == ["dog"] and decode_mask(ok["masks"][0]).any()


def test_concept_without_segmented_images_is_an_error(inputs, tmp_path):
    concepts = concepts_config()
    concepts.subjects.append(ConceptSpec(name="cat", token="<far-cat>", class_word="cat",
                                         images=ROOT / "data/concepts/dog"))
    with pytest.raises(InvalidInputError, match=r"no segmented image for concept\(s\) \['cat'\]"):
        fuse(inputs[0], inputs[1], tmp_path / "out", concepts, small_cfg(), SIDE)


# ----------------------------------------------------------------------------------------------- stage
@pytest.mark.slow
def test_fuse_stage_end_to_end(inputs, tmp_path, params_file):
    def edit(p):
        p["model"]["resolution"] = SIDE
        p["fusion"].update(num_single=4, num_multi=4, preview=4)

    params = params_file(edit)
    out = tmp_path / "fusion"
    cmd = [sys.executable, "-m", "stages.fuse", "--segmented", str(inputs[0]), "--priors", str(inputs[1]),
           "--out", str(out), "--params", str(params)]
    proc = run(cmd, cwd=ROOT)
    assert "fuse: 20 examples (10 reference, 4 single, 4 fusion, 2 prior) at 128 px" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"train.parquet", "preview.png", "summary.json"}
    assert json.loads((out / "summary.json").read_text())["rows"] == 20
    # `far fuse --preview N`: the stage's main, registered in the CLI, only draws from the existing file
    from typer.testing import CliRunner

    from far.cli import app

    before = (out / "train.parquet").read_bytes()
    result = CliRunner().invoke(app, ["fuse", "--out", str(out), "--params", str(params), "--preview", "3",
                                      "--preview-file", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    assert "preview of 3 examples" in result.output and (tmp_path / "grid.png").is_file()
    assert (out / "train.parquet").read_bytes() == before
    result = CliRunner().invoke(app, ["fuse", "--segmented", str(tmp_path / "missing"), "--out",
                                      str(tmp_path / "o2"), "--params", str(params)])
    assert isinstance(result.exception, InvalidInputError)
    assert "missing/manifest.parquet: segmented manifest not found" in str(result.exception)
    assert not (tmp_path / "o2").exists()
