"""The claims' sample grid: a few samples of each variant of the ablation grid for the same prompts and seed.

Each experiment's `data/samples` is a DVC output: its files are read from the DVC cache at the experiment's
commit (`dvc.api.DVCFileSystem`), so the experiments need not be applied to the workspace. One experiment per
variant (its first training seed); the prompts are the first of each kind (two-dog, single, class) in the first
variant's manifest, at its smallest sampling seed, so every column shows the same prompt and seed.

Writes `<dir>/grid.json` (prompts, variants, image files relative to `<dir>`) and the PNGs beside it; the
report (far/report.py) and reports/claims.html show it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from far.io import write_text

SAMPLES = "data/samples"  # the sample stage's output (dvc.yaml), manifest.parquet inside
KIND_ORDER = ("multi", "single", "class")
GRID = "grid.json"


def pick(manifest: pd.DataFrame, per_kind: int = 1) -> list[dict[str, Any]]:
    """(prompt_idx, seed) rows to show: the first `per_kind` prompts of each kind at the smallest seed."""
    seed = int(manifest["seed"].min())
    rows = manifest[manifest["seed"] == seed].sort_values("prompt_idx")
    picked = []
    for kind in KIND_ORDER:
        for r in rows[rows["kind"] == kind].head(per_kind).to_dict("records"):
            picked.append({"prompt_idx": int(r["prompt_idx"]), "seed": seed, "prompt": str(r["prompt"]), "kind": kind})
    return picked


def experiment_revs(show: list[dict[str, Any]]) -> dict[str, str]:
    """{experiment name: full commit} from `dvc exp show --json`."""
    return {e["name"]: e["revs"][0]["rev"] for b in show for e in b.get("experiments") or []
            if e.get("name") and e.get("revs")}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def write_grid(repo: Path, revs: dict[str, str], groups: dict[str, list[str]], out: Path,
               per_kind: int = 1) -> dict[str, Any]:
    """Fetch the grid's images into `out` and write `out/grid.json`; returns what it wrote."""
    from dvc.api import DVCFileSystem

    grid: dict[str, Any] = {"prompts": [], "variants": [], "missing": []}
    out.mkdir(parents=True, exist_ok=True)
    for variant, names in groups.items():
        name = next((n for n in names if n in revs), None)
        if name is None:
            grid["missing"].append(f"{variant}: no experiment of it in `dvc exp show`")
            continue
        try:
            fs = DVCFileSystem(str(repo), rev=revs[name])
            with fs.open(f"{SAMPLES}/manifest.parquet", "rb") as f:
                manifest = pd.read_parquet(f)
            if not grid["prompts"]:
                grid["prompts"] = pick(manifest, per_kind)
            images: list[str | None] = []
            for p in grid["prompts"]:
                row = manifest[(manifest["prompt_idx"] == p["prompt_idx"]) & (manifest["seed"] == p["seed"])]
                if row.empty:
                    images.append(None)
                    continue
                file = f"{_safe(variant)}_{p['prompt_idx']:03d}_{p['seed']}.png"
                with fs.open(f"{SAMPLES}/{row.iloc[0]['path']}", "rb") as f:
                    (out / file).write_bytes(f.read())
                images.append(file)
        except (OSError, ValueError, KeyError) as exc:  # not in the local cache (run elsewhere: `dvc pull`)
            grid["missing"].append(f"{variant} ({name}): samples not readable ({exc.__class__.__name__}: {exc})")
            continue
        grid["variants"].append({"name": variant, "experiment": name, "images": images})
    write_text(out / GRID, json.dumps(grid, indent=2) + "\n")
    return grid
