"""The evaluate stage on real photos standing in for samples: metrics.json, tables, identity, attn_*, DVC."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from far.backbones import load_clip, load_dino
from far.config import load_params
from far.metrics import evaluate, mean_pairwise, open_rgb
from far.subjects import SegmentFinder
from tests._eval_inputs import GREY, make_samples, make_segmented
from tests.conftest import TINY_PARAMS, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("bb")
    return load_clip("tiny", work, CPU), load_dino("tiny", work, CPU)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_segmented(tmp_path_factory.mktemp("seg") / "segmented", n=3)


@pytest.fixture
def cfg(params_file):
    return load_params(params_file())


def not_grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: the composites' subjects (everything not the plain grey background); needs no weights."""
    return (np.abs(rgb.astype(int) - np.array(GREY)) > 6).any(axis=-1)


FINDER = SegmentFinder(not_grey, "not-grey test segmenter", min_area=0.01)


def run_eval(tmp_path: Path, segmented: Path, cfg, backbones, maps: str = "right", finder=FINDER):
    samples = make_samples(tmp_path / f"samples-{maps}", maps=maps)
    return evaluate(samples, segmented, cfg.concepts, cfg.eval, tmp_path, backbones=backbones, finder=finder)


def numbers_only(obj) -> bool:
    if isinstance(obj, dict):
        return all(numbers_only(v) for v in obj.values())
    return obj is None or (isinstance(obj, int | float) and not isinstance(obj, bool))


def test_metrics_are_nested_numeric_and_consistent_with_the_tables(tmp_path, segmented, cfg, backbones) -> None:
    metrics, tables, run_info = run_eval(tmp_path, segmented, cfg, backbones)
    assert set(metrics) == {"overall", "per_concept", "multi_concept"} and numbers_only(metrics)
    names = run_info["backbones"]  # the names live beside the metrics, not in them
    assert "NOT comparable" in names["clip"] and "NOT comparable" in names["dino"]
    assert names["subject_finder"].startswith("segment instances (not-grey test segmenter")
    assert metrics["overall"]["n_images"] == 6 and metrics["multi_concept"]["n_images"] == 2
    assert set(metrics["per_concept"]) == {"dog", "dog3"} and metrics["per_concept"]["dog"]["n_images"] == 2
    per_image = tables["per_image"]
    assert metrics["overall"]["clip_t"] == pytest.approx(per_image.clip_t.mean(), abs=1e-6)
    assert ((per_image.clipscore - 100 * per_image.clip_t.clip(lower=0)).abs() < 1e-4).all()
    assert per_image.clip_prompt.tolist()[0] == "a dog on the beach"
    # Each reference is embedded once per backbone: CLIP = 6 refs + 6 images; DINO also embeds 6 reference
    # crops and 2 x 2 crops of found subjects; the attention regions' crops are the same boxes here (cached).
    assert tables["attn_identity"].bbox.tolist() == tables["identity"].bbox.tolist()
    assert run_info["embeddings_computed_clip"] == 12 and run_info["embeddings_computed_dino"] == 22
    # Independent recomputation of one single-concept image's CLIP-I and DINO.
    row = per_image.iloc[0]
    refs = [open_rgb(p) for p in sorted((segmented / "dog").glob("0?.png"))]
    image = open_rgb(tmp_path / "samples-right" / row.path)
    for bb, key in zip(backbones, ("clip_i", "dino"), strict=True):
        expected = float(mean_pairwise(bb.embed_images([image]), bb.embed_images(refs))[0])
        assert row[key] == pytest.approx(expected, abs=1e-5)
    multi = metrics["multi_concept"]
    assert multi["subjects_found"] == 1.0 and multi["subjects_per_image"] == 2.0
    ident = tables["identity"].set_index(["path", "concept"])
    for path in ident.index.levels[0]:
        assert ident.bbox[(path, "dog")][2] <= 128 <= ident.bbox[(path, "dog3")][0]  # dog left, dog3 right
    # Separate attention blobs: little overlap (their tails); every concept's attention region found.
    assert set(multi["attn_leakage_pairs"]) == {"dog+dog3"}
    assert 0 <= multi["attn_leakage"] < 0.2 and multi["attn_regions_found"] == 1.0


@pytest.fixture(scope="module")
def right_maps(tmp_path_factory, segmented, backbones) -> dict:
    """metrics.json of the composites with the right attention maps, computed once for the module."""
    cfg = load_params(TINY_PARAMS)
    return run_eval(tmp_path_factory.mktemp("right"), segmented, cfg, backbones, "right")[0]


@pytest.mark.parametrize("maps", ["right", "swapped", "identical", "uniform"])
def test_composites_of_the_concepts_own_cutouts_are_identified_whatever_the_maps(
        tmp_path, segmented, cfg, backbones, right_maps, maps) -> None:
    metrics, tables, _ = run_eval(tmp_path, segmented, cfg, backbones, maps)
    multi = metrics["multi_concept"]
    assert multi["identity_accuracy"] == 1.0 and multi["subjects_found"] == 1.0
    assert multi["identity_mixing"] < 1 and (tables["identity"].mixing < 1).all()  # no mixing, per subject
    assert (tables["identity"].margin > 0).all()
    # The verdict never reads the maps: the identity table is the same whatever they are.
    assert {k: v for k, v in multi.items() if not k.startswith("attn_")} == \
        {k: v for k, v in right_maps["multi_concept"].items() if not k.startswith("attn_")}
    # The diagnostics do read them: identical and uniform maps are total leakage (counted, not dropped).
    expected_leakage = {"right": (0, 0.2), "swapped": (0, 0.2), "identical": (0.999, 1), "uniform": (0.999, 1)}
    low, high = expected_leakage[maps]
    assert low <= multi["attn_leakage"] <= high and multi["attn_leakage_pairs"]["dog+dog3"] is not None


def test_attention_crops_follow_the_maps_as_a_diagnostic(tmp_path, segmented, cfg, backbones) -> None:
    right, tables_r, _ = run_eval(tmp_path, segmented, cfg, backbones, "right")
    swapped, tables_s, _ = run_eval(tmp_path, segmented, cfg, backbones, "swapped")

    def by_crop(df: pd.DataFrame) -> pd.DataFrame:  # same image and same crop (left / right half) side by side
        return df.assign(x0=df.bbox.str[0]).sort_values(["path", "x0"]).reset_index(drop=True)

    r, s = by_crop(tables_r["attn_identity"]), by_crop(tables_s["attn_identity"])
    assert (r.concept != s.concept).all() and (r.x0 == s.x0).all()
    assert (r.correct != s.correct).all()  # swapped maps flip every attention-crop verdict, not the identity
    assert swapped["multi_concept"]["attn_identity_accuracy"] == pytest.approx(
        1 - right["multi_concept"]["attn_identity_accuracy"])
    assert swapped["multi_concept"]["identity_accuracy"] == right["multi_concept"]["identity_accuracy"] == 1.0


def test_an_empty_attention_map_is_a_missed_region_and_counts_as_uniform(tmp_path, segmented, cfg, backbones) -> None:
    metrics, tables, _ = run_eval(tmp_path, segmented, cfg, backbones, "empty")
    attn = tables["attn_identity"]
    assert metrics["multi_concept"]["attn_regions_found"] == 0.5
    assert not attn[attn.concept == "dog3"].correct.any() and not attn[attn.concept == "dog3"].found.any()
    leak = tables["attn_leakage"]
    assert leak.overlap.notna().all() and (leak.overlap > 0).all()  # no mass: read as uniform, never dropped
    assert metrics["multi_concept"]["identity_accuracy"] == 1.0  # the subjects are still there


def test_a_subject_the_finder_misses_is_not_identified(tmp_path, segmented, cfg, backbones) -> None:
    def left_only(rgb: np.ndarray) -> np.ndarray:
        mask = not_grey(rgb)
        mask[:, rgb.shape[1] // 2 :] = False
        return mask

    metrics, tables, _ = run_eval(tmp_path, segmented, cfg, backbones, finder=SegmentFinder(left_only, "left", 0.01))
    ident = tables["identity"].set_index("concept")
    assert metrics["multi_concept"]["subjects_found"] == 0.5 and metrics["multi_concept"]["identity_accuracy"] == 0.5
    assert ident.found["dog"].all() and not ident.found["dog3"].any() and ident.mixing["dog3"].isna().all()


def test_the_default_finder_splits_the_u2netp_foreground_into_both_subjects(tmp_path, segmented, cfg, backbones):
    from far.segment import rembg_available

    if not rembg_available(cfg.segment):
        pytest.skip("u2netp weights not installed (`far weights`)")
    cfg.segment.backend = "rembg"
    samples = make_samples(tmp_path / "samples", seeds=(0,))
    metrics, tables, run_info = evaluate(samples, segmented, cfg.concepts, cfg.eval, tmp_path, backbones=backbones,
                                         segment=cfg.segment)
    assert run_info["backbones"]["subject_finder"].startswith("segment instances (rembg:u2netp@sha256:")
    assert metrics["multi_concept"]["subjects_found"] == 1.0 and metrics["multi_concept"]["identity_accuracy"] == 1.0


def test_segment_regions_split_the_segmented_subjects_by_attention(tmp_path, segmented, cfg, backbones) -> None:
    cfg.eval.regions, cfg.eval.crop_padding = "segment", 0.0
    cfg.segment.backend = "grabcut"  # attn_identity regions only: GrabCut keeps one main subject, enough here
    samples = make_samples(tmp_path / "samples", seeds=(0,))
    metrics, tables, run_info = evaluate(samples, segmented, cfg.concepts, cfg.eval, tmp_path, backbones=backbones,
                                         segment=cfg.segment, finder=FINDER)
    assert "segment regions (segment backend grabcut" in run_info["backbones"]["attn_identity"]
    attn = tables["attn_identity"].set_index("concept")
    assert attn.found["dog"] and attn.bbox["dog"][2] <= 128  # the foreground's pixels where dog's map is largest


def test_stage_writes_metrics_and_tables(tmp_path: Path, segmented: Path, params_file) -> None:
    samples = make_samples(tmp_path / "samples", seeds=(0,))
    params = params_file(lambda d: d["eval"].update(batch_size=2))
    metrics, out = tmp_path / "reports" / "metrics.json", tmp_path / "reports" / "eval"
    root = Path(__file__).resolve().parents[1]
    proc = run([sys.executable, "-m", "stages.evaluate", "--samples", str(samples), "--segmented", str(segmented),
                "--metrics", str(metrics), "--out", str(out), "--params", str(params)], cwd=root)
    assert "evaluate: 3 images, CLIP-T" in proc.stdout
    data = json.loads(metrics.read_text())
    assert data["overall"]["n_images"] == 3 and numbers_only(data) and "backbones" not in data
    assert {p.name for p in out.iterdir()} == {"per_image.csv", "per_prompt.csv", "identity.csv", "attn_identity.csv",
                                               "attn_leakage.csv", "eval.json", "backbones.json"}
    assert json.loads((out / "backbones.json").read_text())["clip"].startswith("tiny-clip")
    per_prompt = pd.read_csv(out / "per_prompt.csv")
    assert per_prompt.prompt_idx.tolist() == [0, 1, 2] and math.isfinite(per_prompt.clip_t.iloc[0])
    assert json.loads((out / "eval.json").read_text())["params"]["batch_size"] == 2
    # Bad input: exit code 2 and one line naming the file, nothing overwritten.
    shutil.rmtree(samples / "attn")
    bad = run([sys.executable, "-m", "stages.evaluate", "--samples", str(samples), "--segmented", str(segmented),
               "--metrics", str(metrics), "--out", str(out), "--params", str(params)], cwd=root, check=False)
    assert bad.returncode == 2 and "manifest.parquet row 0: file" in bad.stderr
    assert "attn/000_0_dog.npy does not exist" in bad.stderr and "Traceback" not in bad.stderr
    assert json.loads(metrics.read_text()) == data


@pytest.mark.slow
def test_dvc_repro_evaluate_shows_nested_metrics_and_plots(project: Path) -> None:
    (project / "params.yaml").write_text(TINY_PARAMS.read_text())  # the samples below are of the DreamBench dogs
    run(["git", "commit", "-qam", "tiny DreamBench params"], project)
    make_samples(project / "data" / "samples", seeds=(0,))
    make_segmented(project / "data" / "segmented", n=2)
    run([sys.executable, "-m", "dvc", "repro", "--single-item", "evaluate"], project)
    shown = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], project).stdout)
    data = shown[""]["data"]["reports/metrics.json"]["data"]
    assert data["overall"]["n_images"] == 3 and "identity_accuracy" in data["multi_concept"]
    plots = run([sys.executable, "-m", "dvc", "plots", "show", "--json"], project, check=False).stdout
    assert '"reports/eval/per_prompt.csv"' in plots and '"clip_t"' in plots
    # An eval param change re-runs only evaluate, and `dvc metrics diff` sees the nested numbers.
    # metrics.json is a cached DVC output: the committed dvc.lock is what `metrics diff` compares against
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "eval"], project)
    params = (project / "params.yaml").read_text().replace("crop_padding: 0.1 ", "crop_padding: 0.3 ")
    (project / "params.yaml").write_text(params)
    status = run([sys.executable, "-m", "dvc", "status", "evaluate"], project).stdout
    assert "params.yaml" in status and "eval" in status
    run([sys.executable, "-m", "dvc", "repro", "--single-item", "evaluate"], project)
    diff = json.loads(run([sys.executable, "-m", "dvc", "metrics", "diff", "--all", "--json"], project).stdout)
    changes = diff["reports/metrics.json"]
    assert changes["overall.clip_t"]["old"] == changes["overall.clip_t"]["new"]  # whole images: unaffected
    margin = changes["multi_concept.identity_margin"]  # the identity crops changed
    assert margin["old"] is not None and margin["old"] != margin["new"]
