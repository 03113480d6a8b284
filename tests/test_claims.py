"""far/claims.py on a hand-made `dvc exp show --json`: one claim clearly supported, one not separable, one not
supported, one not measured; and the grid's seed expansion and re-run rule (pipelines/ablation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from far.claims import SEPARATION, write_claims
from far.errors import InvalidInputError
from pipelines.ablation import Variant, experiment_metrics, finished, load_grid

SEEDS = (3, 4, 5)


def world(identity=0.8, unseen=0.5, memorised=0.3, both=0.4, leakage=0.2, duplicate=0.1, drift=0.05,
          likeness=0.9, likeness2=0.7):
    return {"single": {"identity": identity, "identity_n": 16, "likeness": likeness, "likeness_n": 16,
                       "background_unseen": unseen, "background_unseen_n": 16, "memorised": memorised,
                       "memorised_n": 16, "n_images": 32},
            "multi": {"both": both, "both_n": 16, "likeness": likeness2, "likeness_n": 16, "leakage": leakage,
                      "leakage_n": 16, "duplicate": duplicate, "duplicate_n": 16, "n_images": 16},
            "class": {"drift": drift, "drift_n": 8, "n_images": 8}}


def exp(name: str, block: dict, params: dict | None = None, state: str | None = None) -> dict:
    return {"name": name, "executor": {"state": state} if state else None, "revs": [{
        "rev": name.encode().hex().ljust(40, "0")[:40], "name": name, "error": None, "data": {
            "params": {"params.yaml": {"data": params or {}}},
            # two metric files: experiment_metrics prefixes the keys with the file, as with the real dvc.yaml
            "metrics": {"reports/metrics.json": {"data": {"world": block, "overall": {"clip_t": 0.3}}},
                        "dvclive/metrics.json": {"data": {"loss": 0.1}}}}}]}


def show(experiments: list[dict]) -> list[dict]:
    return [{"rev": "workspace", "name": None, "data": {}, "experiments": None},
            {"rev": "a" * 40, "name": "main", "data": {}, "experiments": experiments}]


def grid_show() -> tuple[list[dict], dict[str, list[str]]]:
    """Claim 1 (fusion): memorised 0.30 -> 0.10 and unseen 0.50 -> 0.70 at spread 0.01, identity equal: supported.
    Claim 2 (refine): leakage 0.20 -> 0.18 at spread 0.05: not separable. Claim 4: dreambooth drifts more (0.20)
    than each crossattn_kv variant, but `far-no-tokens` has no experiment here: not measured. `lora`'s only
    experiment failed: listed, never averaged."""
    jitter = {3: -0.01, 4: 0.0, 5: 0.01}
    noisy = {3: -0.05, 4: 0.0, 5: 0.05}
    blocks = {
        "baseline": lambda s: world(memorised=0.3 + jitter[s], unseen=0.5 + jitter[s], leakage=0.2 + noisy[s],
                                    drift=0.05 + jitter[s] / 10),
        "+fusion": lambda s: world(memorised=0.1 + jitter[s], unseen=0.7 + jitter[s], leakage=0.2 + noisy[s],
                                   drift=0.05 + jitter[s] / 10),
        "+refine": lambda s: world(leakage=0.18 + noisy[s], drift=0.05 + jitter[s] / 10),
        "far": lambda s: world(leakage=0.18 + noisy[s], both=0.45 + noisy[s], drift=0.05 + jitter[s] / 10),
        "dreambooth": lambda s: world(drift=0.2 + jitter[s] / 10),
    }
    experiments = [exp(f"{v}-s{s}", f(s)) for v, f in blocks.items() for s in SEEDS]
    experiments.append(exp("lora-s3", world(), state="failed"))
    groups = {v: [f"{v}-s{s}" for s in SEEDS] for v in [*blocks, "lora"]}
    return show(experiments), groups


def test_claims_from_a_known_grid(tmp_path: Path):
    shown, groups = grid_show()
    runs = experiment_metrics(shown, {n for names in groups.values() for n in names})
    claims = write_claims(runs, groups, tmp_path / "claims.md")
    assert claims["1"]["verdict"] == "supported"
    assert claims["2"]["verdict"] == "not separable at this size"
    assert claims["3"]["verdict"] == "not separable at this size"  # far's both 0.45 vs 0.40 at spread 0.05
    # claim 4 holds for every variant that ran, but far-no-tokens never did: not measured
    assert claims["4"]["verdict"] == "not measured"
    assert [r["outcome"] for r in claims["4"]["rows"]] == ["holds"] * 4 + ["missing"]

    memorised = claims["1"]["rows"][0]
    assert memorised["a"].mean == pytest.approx(0.1) and memorised["b"].mean == pytest.approx(0.3)
    assert memorised["a"].spread == pytest.approx(0.01)  # sample std (ddof=1) of 0.09, 0.10, 0.11
    assert memorised["threshold"] == pytest.approx(SEPARATION * 0.01)

    text = (tmp_path / "claims.md").read_text()
    assert "1. **supported**" in text and "2. **not separable at this size**" in text
    assert "memorised +fusion 0.100 vs baseline 0.300 (difference -0.200, needed > 0.020" in text
    assert "2 x max(spread_a, spread_b)" in text and "ddof=1" in text
    assert "| `single.memorised` |" in text and "0.100 ± 0.010 (3 seeds), n=16" in text
    assert "`lora-s3`" in text and "`lora`" not in text.split("## Verdicts")[0]  # failed: listed, not averaged
    numbers = json.loads((tmp_path / "claims.json").read_text())
    assert numbers["claims"]["1"]["verdict"] == 1 and numbers["claims"]["2"]["verdict"] == 0
    assert numbers["variants"]["+fusion"]["single.memorised"]["mean"] == pytest.approx(0.1)
    assert "lora" not in numbers["variants"]
    assert all(v is None or isinstance(v, int | float) for v in _leaves(numbers))


def _leaves(obj):
    if isinstance(obj, dict | list):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from _leaves(v)
    else:
        yield obj


def test_a_claim_against_the_data_is_not_supported(tmp_path: Path):
    shown, groups = grid_show()
    shown[1]["experiments"] += [exp(f"far-no-tokens-s{s}", world(drift=0.3 + (s - 4) / 1000)) for s in SEEDS]
    groups["far-no-tokens"] = [f"far-no-tokens-s{s}" for s in SEEDS]
    runs = experiment_metrics(shown, {n for names in groups.values() for n in names})
    claims = write_claims(runs, groups, tmp_path / "claims.md")
    # far-no-tokens drifts 0.30 +- 0.001, dreambooth 0.20 +- 0.001: separated, against the claim (one suffices)
    assert claims["4"]["verdict"] == "not supported"
    assert [r["outcome"] for r in claims["4"]["rows"]] == ["holds"] * 4 + ["against"]
    assert "4. **not supported**" in (tmp_path / "claims.md").read_text()


def test_one_seed_separates_nothing(tmp_path: Path):
    shown = show([exp("baseline-s3", world(memorised=0.9, unseen=0.1)),
                  exp("+fusion-s3", world(memorised=0.0, unseen=1.0))])
    runs = experiment_metrics(shown, {"baseline-s3", "+fusion-s3"})
    claims = write_claims(runs, {"baseline": ["baseline-s3"], "+fusion": ["+fusion-s3"]}, tmp_path / "c.md")
    assert claims["1"]["verdict"] == "not separable at this size"
    assert "needed > n/a (a side has one seed)" in (tmp_path / "c.md").read_text()


# ------------------------------------------------------------------------------- the grid's seeds
def _params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"seed": 0, "modules": "crossattn_kv", "refine": {"weight": 0.1}}}))
    return path


def test_grid_expands_variant_by_seed_and_restricts_per_variant(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("pipelines.ablation._validate", lambda *a: None)  # far/config.py is tested elsewhere
    grid = tmp_path / "grid.yaml"
    grid.write_text("seeds: [3, 4, 5]\nvariants:\n  far: {}\n  dreambooth:\n    seeds: [3]\n"
                    "    train.modules: unet\n")
    exps = load_grid(grid, _params(tmp_path))
    assert [e.name for e in exps] == ["far-s3", "far-s4", "far-s5", "dreambooth-s3"]
    assert exps[1].group == "far" and exps[1].seed == 4 and exps[1].overrides == {"train.seed": 4}
    assert exps[3].set_args() == ["-S", 'train.modules="unet"', "-S", "train.seed=3"]
    for bad, match in (("seeds: [3]\nvariants:\n  a:\n    seeds: [4]\n", r"seeds \[4\] are not in"),
                       ("variants:\n  a:\n    seeds: [4]\n", "set `seeds:` at the top"),
                       ("seeds: [3, 3]\nvariants:\n  a: {}\n", "distinct integers"),
                       ("seeds: [3]\nvariants:\n  a:\n    train.seed: 1\n", "set by `seeds:`")):
        grid.write_text(bad)
        with pytest.raises(InvalidInputError, match=match):
            load_grid(grid, _params(tmp_path))


def test_a_rerun_keeps_finished_experiments_with_the_same_params_only(tmp_path: Path):
    base = yaml.safe_load(_params(tmp_path).read_text())
    far3 = Variant("far-s3", {"train.seed": 3}, "far", 3)
    far4 = Variant("far-s4", {"train.seed": 4}, "far", 4)
    db = Variant("dreambooth-s3", {"train.modules": "unet", "train.seed": 3}, "dreambooth", 3)
    ran = {"train": {"seed": 3, "modules": "crossattn_kv", "refine": {"weight": 0.1}}}
    shown = show([exp("far-s3", world(), ran),
                  exp("far-s4", world(), {"train": {**ran["train"], "seed": 4}}, state="failed"),
                  exp("dreambooth-s3", world(), ran)])  # ran before the grid said modules: unet
    assert finished(shown, [far3, far4, db], base) == {"far-s3"}
    base["train"]["refine"]["weight"] = 0.2  # params.yaml changed since: nothing is kept
    assert finished(shown, [far3, far4, db], base) == set()


# ------------------------------------------------------------------------- the report's Claims section
def test_claims_section_shows_the_table_verdicts_and_the_side_by_side_grid(tmp_path: Path):
    import numpy as np
    import pandas as pd
    from PIL import Image

    from far.claims_grid import pick
    from far.report import Context, read_claims, write_claims_page

    manifest = pd.DataFrame({"prompt_idx": [0, 0, 1, 1, 2], "seed": [1, 0, 1, 0, 0],
                             "kind": ["single", "single", "multi", "multi", "class"],
                             "prompt": ["a <a> dog", "a <a> dog", "two dogs", "two dogs", "a dog"]})
    assert [(p["kind"], p["prompt_idx"], p["seed"]) for p in pick(manifest)] == [
        ("multi", 1, 0), ("single", 0, 0), ("class", 2, 0)]

    shown, groups = grid_show()
    runs = experiment_metrics(shown, {n for names in groups.values() for n in names})
    claims = tmp_path / "reports" / "claims.md"
    write_claims(runs, groups, claims)
    folder = claims.with_suffix("")
    folder.mkdir()
    for name in ("far_001_0.png", "baseline_001_0.png"):
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(folder / name)
    (folder / "grid.json").write_text(json.dumps({
        "prompts": [{"prompt_idx": 1, "seed": 0, "prompt": "two dogs", "kind": "multi"}],
        "variants": [{"name": "baseline", "experiment": "baseline-s3", "images": ["baseline_001_0.png"]},
                     {"name": "far", "experiment": "far-s3", "images": ["far_001_0.png"]}],
        "missing": ["lora (lora-s3): samples not readable"]}))

    ctx = Context()
    read_claims(claims, tmp_path / "assets", "assets", 8, ctx)
    assert "<table>" in ctx.claims_html and "<strong>supported</strong>" in ctx.claims_html
    assert [v["images"] for v in ctx.claims_grid["variants"]] == [["assets/claims/baseline_001_0.jpg"],
                                                                 ["assets/claims/far_001_0.jpg"]]
    assert Image.open(tmp_path / "assets/claims/far_001_0.jpg").size == (8, 8)

    page = write_claims_page(claims, claims.with_suffix(".html"))
    html = claims.with_suffix(".html").read_text()
    assert page.claims_grid and 'src="claims/far_001_0.png"' in html and "lora (lora-s3)" in html
    assert "2 x max(spread_a, spread_b)" in html

    empty = Context()
    read_claims(tmp_path / "none.md", None, "x", 8, empty)
    assert empty.claims_html is None and empty.claims_grid is None


def test_grid_reads_each_experiments_samples_from_the_dvc_cache_at_its_commit(tmp_path: Path):
    """A committed DVC-tracked data/samples (as an experiment's commit holds it), read without checking it out."""
    import shutil
    import subprocess

    import numpy as np
    import pandas as pd
    from dvc.repo import Repo
    from PIL import Image

    from far.claims_grid import write_grid

    root = tmp_path / "repo"
    samples = root / "data" / "samples"
    samples.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    Repo.init(str(root))
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(samples / "001_0.png")
    pd.DataFrame({"prompt_idx": [1], "seed": [0], "kind": ["multi"], "prompt": ["two dogs"],
                  "path": ["001_0.png"]}).to_parquet(samples / "manifest.parquet")
    Repo(str(root)).add(str(samples))
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "samples"], cwd=root, check=True)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    shutil.rmtree(samples)  # the workspace no longer has them: only the cache at the commit does

    grid = write_grid(root, {"far-s3": rev}, {"far": ["far-s3"], "lora": ["lora-s3"]}, tmp_path / "claims")
    assert grid["variants"] == [{"name": "far", "experiment": "far-s3", "images": ["far_001_0.png"]}]
    assert grid["prompts"][0]["prompt"] == "two dogs"
    assert grid["missing"] == ["lora: no experiment of it in `dvc exp show`"]
    assert np.asarray(Image.open(tmp_path / "claims" / "far_001_0.png"))[0, 0, 0] == 7
    assert json.loads((tmp_path / "claims" / "grid.json").read_text()) == grid


def test_an_experiment_found_under_two_commits_is_read_from_the_first_listed():
    """`far claims --rev A --rev B` sorts A's baseline first; a name under both is A's experiment, unless A's
    failed and B's finished."""
    first = {"rev": "b" * 40, "name": "later", "data": {}, "experiments": [
        exp("far-s3", world(identity=0.1)), exp("far-s5", world(identity=0.0), state="failed")]}
    shown = [first, *show([exp("far-s3", world(identity=0.9)), exp("far-s4", world(identity=0.5)),
                           exp("far-s5", world(identity=0.7))])]
    runs = experiment_metrics(shown, {"far-s3", "far-s4", "far-s5"})
    identity = {n: r["metrics"]["reports/metrics.json:world.single.identity"] for n, r in runs.items()}
    assert identity == {"far-s3": 0.1, "far-s4": 0.5, "far-s5": 0.7}
    assert runs["far-s5"]["state"] == "success"
