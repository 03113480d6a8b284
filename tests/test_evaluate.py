"""The evaluate stage on real photos standing in for samples: metrics.json, tables, identity, leakage, DVC."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from far.backbones import load_clip, load_dino
from far.config import load_params
from far.metrics import evaluate, mean_pairwise, open_rgb
from tests._eval_inputs import make_samples, make_segmented
from tests.conftest import run

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


def run_eval(tmp_path: Path, segmented: Path, cfg, backbones, maps: str = "right"):
    samples = make_samples(tmp_path / f"samples-{maps}", maps=maps)
    return evaluate(samples, segmented, cfg.concepts, cfg.eval, tmp_path, backbones=backbones)


def test_metrics_are_nested_labelled_and_consistent_with_the_tables(tmp_path, segmented, cfg, backbones) -> None:
    metrics, tables, run_info = run_eval(tmp_path, segmented, cfg, backbones)
    assert set(metrics) == {"overall", "per_concept", "multi_concept", "backbones"}
    assert "NOT comparable" in metrics["backbones"]["clip"] and "NOT comparable" in metrics["backbones"]["dino"]
    assert metrics["overall"]["n_images"] == 6 and metrics["multi_concept"]["n_images"] == 2
    assert set(metrics["per_concept"]) == {"dog", "dog3"} and metrics["per_concept"]["dog"]["n_images"] == 2
    per_image = tables["per_image"]
    assert metrics["overall"]["clip_t"] == pytest.approx(per_image.clip_t.mean(), abs=1e-6)
    assert ((per_image.clipscore - 100 * per_image.clip_t.clip(lower=0)).abs() < 1e-4).all()
    assert per_image.clip_prompt.tolist()[0] == "a dog on the beach"
    # Each reference is embedded once per backbone: CLIP = 6 refs + 6 images; DINO also embeds 6 reference
    # crops and 2 x 2 identity crops.
    assert run_info["embeddings_computed_clip"] == 12 and run_info["embeddings_computed_dino"] == 22
    # Independent recomputation of one single-concept image's CLIP-I and DINO.
    row = per_image.iloc[0]
    refs = [open_rgb(p) for p in sorted((segmented / "dog").glob("0?.png"))]
    image = open_rgb(tmp_path / "samples-right" / row.path)
    for bb, key in zip(backbones, ("clip_i", "dino"), strict=True):
        expected = float(mean_pairwise(bb.embed_images([image]), bb.embed_images(refs))[0])
        assert row[key] == pytest.approx(expected, abs=1e-5)
    # Disjoint attention blobs: little leakage either way; every concept's region found.
    multi = metrics["multi_concept"]
    assert set(multi["leakage_pairs"]) == {"dog->dog3", "dog3->dog"}
    assert 0 <= multi["attention_leakage"] < 0.05 and multi["regions_found"] == 1.0
    ident = tables["identity"]
    for dog, dog3 in zip(ident[ident.concept == "dog"].bbox, ident[ident.concept == "dog3"].bbox, strict=True):
        assert dog[2] <= 128 <= dog3[0]  # dog's crop lies in the left half, dog3's in the right half


def test_swapped_attention_maps_flip_every_identity_verdict(tmp_path, segmented, cfg, backbones) -> None:
    right, tables_r, _ = run_eval(tmp_path, segmented, cfg, backbones, "right")
    swapped, tables_s, _ = run_eval(tmp_path, segmented, cfg, backbones, "swapped")
    acc_r, acc_s = right["multi_concept"]["identity_accuracy"], swapped["multi_concept"]["identity_accuracy"]
    assert acc_s == pytest.approx(1 - acc_r)  # two concepts: a crop is either its own or the other one
    def by_crop(df: pd.DataFrame) -> pd.DataFrame:  # same image and same crop (left / right half) side by side
        return df.assign(x0=df.bbox.str[0]).sort_values(["path", "x0"]).reset_index(drop=True)

    r, s = by_crop(tables_r["identity"]), by_crop(tables_s["identity"])
    assert (r.concept != s.concept).all() and (r.x0 == s.x0).all()
    assert (r.correct != s.correct).all()
    assert ((r.mixing * s.mixing - 1).abs() < 1e-9).all()  # wrong/right becomes right/wrong
    assert right["multi_concept"]["attention_leakage"] == pytest.approx(swapped["multi_concept"]["attention_leakage"])


def test_an_empty_attention_map_is_a_missed_subject(tmp_path, segmented, cfg, backbones) -> None:
    metrics, tables, _ = run_eval(tmp_path, segmented, cfg, backbones, "empty")
    ident = tables["identity"]
    assert metrics["multi_concept"]["regions_found"] == 0.5
    assert not ident[ident.concept == "dog3"].correct.any() and not ident[ident.concept == "dog3"].found.any()
    leak = tables["leakage"]
    assert leak[leak.source == "dog3"].share.isna().all()  # no attention mass: undefined, not 0
    assert metrics["multi_concept"]["leakage_pairs"]["dog->dog3"] is None  # dog3 has no region: undefined, not 0


def test_segment_regions_split_the_segmented_subjects_by_attention(tmp_path, segmented, cfg, backbones) -> None:
    cfg.eval.regions, cfg.eval.crop_padding = "segment", 0.0
    cfg.segment.backend = "grabcut"  # the synthetic samples' plain background; the default would take u2netp
    samples = make_samples(tmp_path / "samples", seeds=(0,))
    metrics, tables, _ = evaluate(samples, segmented, cfg.concepts, cfg.eval, tmp_path, backbones=backbones,
                                  segment=cfg.segment)
    assert "segment regions (segment backend grabcut" in metrics["backbones"]["identity"]
    ident = tables["identity"].set_index("concept")
    assert ident.found.all()
    assert ident.bbox["dog"][2] <= 128 <= ident.bbox["dog3"][0]  # the foreground is split where the maps cross
    assert tables["leakage"].share.between(0, 0.2).all()


def test_stage_writes_metrics_and_tables(tmp_path: Path, segmented: Path, params_file) -> None:
    samples = make_samples(tmp_path / "samples", seeds=(0,))
    params = params_file(lambda d: d["eval"].update(batch_size=2))
    metrics, out = tmp_path / "reports" / "metrics.json", tmp_path / "reports" / "eval"
    root = Path(__file__).resolve().parents[1]
    proc = run([sys.executable, "-m", "stages.evaluate", "--samples", str(samples), "--segmented", str(segmented),
                "--metrics", str(metrics), "--out", str(out), "--params", str(params)], cwd=root)
    assert "evaluate: 3 images, CLIP-T" in proc.stdout
    data = json.loads(metrics.read_text())
    assert data["overall"]["n_images"] == 3 and data["backbones"]["clip"].startswith("tiny-clip")
    assert {p.name for p in out.iterdir()} == {"per_image.csv", "per_prompt.csv", "identity.csv", "leakage.csv",
                                               "eval.json"}
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
