"""`far claims`: the paper's claims judged on the ablation grid's DVC experiments -> reports/claims.md (+ .json).

Input: `dvc exp show --json` (parsed by pipelines.ablation.experiment_metrics) and the grid (ablations.yaml,
expanded variant x training seed by pipelines.ablation.load_grid). Per variant, each world figure (the numeric
leaves of the `world` block of reports/metrics.json, far/world/verdict.py) is summarised over the training
seeds as mean and spread, the spread being the *sample* standard deviation (ddof=1) over seeds.

A difference between two variants counts only when |mean_a - mean_b| > 2 x max(spread_a, spread_b) (SEPARATION);
with fewer than two seeds on either side there is no spread and nothing counts. Each claim is a list of
comparisons: `better` ones must separate in the claimed direction, `not_worse` ones must not separate against
it. The claim is *not supported* when some comparison separates against the claim, *supported* when every
comparison holds, *not measured* when a variant or figure it needs is missing from the experiments, and *not
separable at this size* otherwise.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from far.io import write_text

SEPARATION = 2.0  # a difference counts when it exceeds SEPARATION x the larger seed spread
METRICS_FILE = "reports/metrics.json"  # experiment_metrics prefixes keys with it when there are several files
WORLD = "world."  # the world block (far/world/verdict.py summarize): every numeric leaf is a figure
# The figures the claims read: name in the sentences -> flat key of reports/metrics.json. The one place to
# follow a renamed metric (far/world/verdict.py FIGURES; each figure f has its image count f_n beside it).
KEYS = {
    "identity": "world.single.identity",  # single prompts: the concept is some subject
    "likeness": "world.single.likeness",  # graded identity: share of the concept's 4 properties its best subject has
    "unseen background": "world.single.background_unseen",  # asked background (one the concept was never shown on)
    "memorised": "world.single.memorised",  # a reference background came instead of the asked unseen one
    "both correct": "world.multi.both",  # two-dog prompts: each dog is some subject
    "two-dog likeness": "world.multi.likeness",  # the two dogs' mean likeness
    "leakage": "world.multi.leakage",  # a subject mixing the two dogs' attributes
    "duplicates": "world.multi.duplicate",  # one dog appears twice or more
    "prior drift": "world.class.drift",  # "a dog": the plain class came out as one of our dogs
}
HIGHER_IS_BETTER = {"identity": True, "likeness": True, "unseen background": True, "memorised": False,
                    "both correct": True, "two-dog likeness": True, "leakage": False, "duplicates": False,
                    "prior drift": False}
VERDICT_CODE = {"supported": 1, "not separable at this size": 0, "not supported": -1, "not measured": None}
CROSSATTN_KV = ("baseline", "+fusion", "+refine", "far", "far-no-tokens")  # variants training crossattn_kv


@dataclass(frozen=True)
class Comparison:
    a: str  # variant claimed better (or not worse)
    b: str
    figure: str  # a KEYS name
    kind: str = "better"  # better | not_worse


# The claims of issue 13, as comparisons between variants of ablations.yaml.
CLAIMS: dict[str, tuple[str, list[Comparison]]] = {
    "1": ("Concept Fusion prevents overfitting (+fusion vs baseline): fewer memorised backgrounds, better unseen "
          "backgrounds, no loss of identity",
          [Comparison("+fusion", "baseline", "memorised"), Comparison("+fusion", "baseline", "unseen background"),
           Comparison("+fusion", "baseline", "identity", "not_worse"),
           Comparison("+fusion", "baseline", "likeness", "not_worse")]),
    "2": ("Localized Refinement prevents leakage (+refine vs baseline, far vs +fusion): less leakage, fewer "
          "duplicates, more two-dog images with both dogs right",
          [Comparison(a, b, f) for a, b in (("+refine", "baseline"), ("far", "+fusion"))
           for f in ("leakage", "duplicates", "both correct", "two-dog likeness")]),
    "3": ("Both together are best on two-dog prompts (far vs baseline, +fusion, +refine on both correct and "
          "two-dog likeness), and FaR works for single concepts (far vs baseline: identity, likeness not worse)",
          [*[Comparison("far", b, f) for b in ("baseline", "+fusion", "+refine")
             for f in ("both correct", "two-dog likeness")],
           Comparison("far", "baseline", "identity", "not_worse"),
           Comparison("far", "baseline", "likeness", "not_worse")]),
    "4": ("Training only the cross-attention K/V keeps prior knowledge: less prior drift on \"a dog\" than the "
          "full UNet (dreambooth)",
          [Comparison(a, "dreambooth", "prior drift") for a in CROSSATTN_KV]),
    "5": ("On the whole UNet, where identity is learned, FaR's parts do what claims 1-3 say (dreambooth as the "
          "baseline): fusion fewer memorised backgrounds with identity not worse, refinement less leakage, "
          "both together more two-dog images with both dogs right",
          [Comparison("+fusion-unet", "dreambooth", "memorised"),
           Comparison("+fusion-unet", "dreambooth", "identity", "not_worse"),
           Comparison("+refine-unet", "dreambooth", "leakage"),
           Comparison("far-unet", "+fusion-unet", "leakage"),
           *[Comparison("far-unet", b, "both correct") for b in ("dreambooth", "+fusion-unet", "+refine-unet")],
           Comparison("far-unet", "dreambooth", "identity", "not_worse")]),
    "6": ("Localized Refinement at ten times the default weight prevents leakage (+refine-x10 vs baseline, "
          "far-x10 vs +fusion): less leakage, more two-dog images with both dogs right, identity not worse",
          [Comparison(a, b, f, kind) for a, b in (("+refine-x10", "baseline"), ("far-x10", "+fusion"))
           for f, kind in (("leakage", "better"), ("both correct", "better"), ("identity", "not_worse"))]),
}


@dataclass(frozen=True)
class Stat:
    mean: float | None
    spread: float | None  # sample std over seeds (ddof=1); None with fewer than two seeds
    seeds: int  # training seeds with a value
    images: float | None  # mean image count per seed (the figure's `_n`)

    def text(self) -> str:
        if self.mean is None:
            return "n/a"
        sd = "no spread" if self.spread is None else f"± {self.spread:.3f}"
        return f"{self.mean:.3f} {sd} ({self.seeds} seeds)"


def _world(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The flat world figures of one experiment, without the metrics-file prefix."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        file, _, inner = key.rpartition(":")
        if file not in ("", METRICS_FILE) or not inner.startswith(WORLD):
            continue
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            out[inner] = None if value is None or math.isnan(value) else float(value)
    return out


def _stat(values: Iterable[float | None], counts: Iterable[float | None]) -> Stat:
    v = [x for x in values if x is not None]
    n = [x for x in counts if x is not None]
    mean = sum(v) / len(v) if v else None
    spread = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) >= 2 else None
    return Stat(mean, spread, len(v), sum(n) / len(n) if n else None)


def summarize(runs: dict[str, dict[str, Any]], groups: dict[str, list[str]]) -> dict[str, dict[str, Stat]]:
    """{variant: {world figure key: Stat}} over each variant's experiments that finished with metrics.

    `runs`: experiment_metrics' output; `groups`: {variant: [experiment names]} in grid order.
    """
    out: dict[str, dict[str, Stat]] = {}
    for variant, names in groups.items():
        figures = [_world(runs[n]["metrics"]) for n in names if n in runs and runs[n]["state"] == "success"]
        figures = [f for f in figures if f]
        if not figures:
            continue
        keys = dict.fromkeys(k for f in figures for k in f if not k.endswith("_n") and not k.endswith("n_images"))
        out[variant] = {k: _stat((f.get(k) for f in figures), (f.get(f"{k}_n") for f in figures)) for k in keys}
    return out


def compare(stats: dict[str, dict[str, Stat]], c: Comparison) -> dict[str, Any]:
    """One comparison: the numbers and its outcome (holds | against | not separable | missing)."""
    key = KEYS[c.figure]
    sa, sb = stats.get(c.a, {}).get(key), stats.get(c.b, {}).get(key)
    row: dict[str, Any] = {"comparison": c, "a": sa, "b": sb}
    if sa is None or sb is None or sa.mean is None or sb.mean is None:
        return row | {"outcome": "missing", "diff": None, "threshold": None}
    diff = sa.mean - sb.mean
    threshold = None if sa.spread is None or sb.spread is None else SEPARATION * max(sa.spread, sb.spread)
    separated = threshold is not None and abs(diff) > threshold
    good = (diff > 0) == HIGHER_IS_BETTER[c.figure]
    if c.kind == "better":
        outcome = "holds" if separated and good else "against" if separated else "not separable"
    else:
        outcome = "against" if separated and not good else "holds"
    return row | {"outcome": outcome, "diff": diff, "threshold": threshold}


def judge(stats: dict[str, dict[str, Stat]]) -> dict[str, dict[str, Any]]:
    """{claim id: {"text", "verdict", "rows"}} by the rule of the module docstring."""
    out: dict[str, dict[str, Any]] = {}
    for cid, (text, comparisons) in CLAIMS.items():
        rows = [compare(stats, c) for c in comparisons]
        outcomes = {r["outcome"] for r in rows}
        # one measured comparison against the claim refutes it; support needs every comparison measured
        verdict = ("not supported" if "against" in outcomes else "not measured" if "missing" in outcomes
                   else "supported" if outcomes == {"holds"} else "not separable at this size")
        out[cid] = {"text": text, "verdict": verdict, "rows": rows}
    return out


def _row_text(r: dict[str, Any]) -> str:
    c: Comparison = r["comparison"]
    if r["outcome"] == "missing":
        absent = [v for v, s in ((c.a, r["a"]), (c.b, r["b"])) if s is None or s.mean is None]
        return f"{c.figure} {c.a} vs {c.b}: not measured ({', '.join(absent)} missing)"
    want = "higher" if HIGHER_IS_BETTER[c.figure] else "lower"
    need = "n/a (a side has one seed)" if r["threshold"] is None else f"{r['threshold']:.3f}"
    return (f"{c.figure} {c.a} {r['a'].mean:.3f} vs {c.b} {r['b'].mean:.3f} (difference {r['diff']:+.3f}, "
            f"needed > {need}, {want} is better{'' if c.kind == 'better' else ', must not be worse'}): "
            f"{r['outcome']}")


def markdown(stats: dict[str, dict[str, Stat]], claims: dict[str, dict[str, Any]], missing: list[str],
             source: str | None = None) -> str:
    variants = list(stats)
    keys = list(dict.fromkeys(k for s in stats.values() for k in s))
    lines = ["# Claims", "",
             "Written by `far claims` from `dvc exp show --json` (the experiments of `ablations.yaml`, one per",
             "variant and training seed" + (f", derived from commit `{source}`" if source else "") + ").",
             "Each cell: mean ± spread over training seeds, the spread being the sample standard deviation",
             "(ddof=1) over seeds; then the seeds and the images per seed (`n`).",
             f"**Rule:** a difference counts only where |mean_a - mean_b| > {SEPARATION:g} x max(spread_a, spread_b);"
             " with one seed there is no spread and nothing counts.", "",
             "| figure | " + " | ".join(f"`{v}`" for v in variants) + " |", "|---|" + "---|" * len(variants)]
    for k in keys:
        cells = []
        for v in variants:
            s = stats[v].get(k)
            cells.append("-" if s is None else s.text() + ("" if s.images is None else f", n={s.images:g}"))
        lines.append(f"| `{k.removeprefix(WORLD)}` | " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", ""]
    for cid, c in claims.items():
        lines.append(f"{cid}. **{c['verdict']}**: {c['text']}. " + "; ".join(_row_text(r) for r in c["rows"]) + ".")
    if missing:
        lines += ["", "Experiments of the grid without metrics (not run, failed or still queued): "
                  + ", ".join(f"`{m}`" for m in missing) + "."]
    return "\n".join(lines) + "\n"


def numbers(stats: dict[str, dict[str, Stat]], claims: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """reports/claims.json: numbers only (verdict codes: 1 supported, 0 not separable, -1 not supported,
    null not measured)."""
    return {
        "separation": SEPARATION,
        "variants": {v: {k.removeprefix(WORLD): {"mean": s.mean, "spread": s.spread, "seeds": s.seeds,
                                                  "images": s.images} for k, s in figs.items()}
                     for v, figs in stats.items()},
        "claims": {cid: {"verdict": VERDICT_CODE[c["verdict"]],
                         "comparisons": [{"diff": r["diff"], "threshold": r["threshold"]} for r in c["rows"]]}
                   for cid, c in claims.items()},
    }


def write_claims(runs: dict[str, dict[str, Any]], groups: dict[str, list[str]], out: Path,
                 source: str | None = None) -> dict[str, Any]:
    """Write `out` (claims.md) and claims.json beside it; returns the judged claims. `source`: the commit."""
    stats = summarize(runs, groups)
    claims = judge(stats)
    missing = [n for names in groups.values() for n in names
               if n not in runs or runs[n]["state"] != "success" or not _world(runs[n]["metrics"])]
    write_text(out, markdown(stats, claims, missing, source))
    write_text(out.with_suffix(".json"), json.dumps(numbers(stats, claims), indent=2) + "\n")
    return claims


def _commit(repo: Path, rev: str) -> str | None:
    """`rev` as a short commit id (None outside a git repository)."""
    import subprocess

    proc = subprocess.run(["git", "rev-parse", "--short", rev], cwd=repo, capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def run(repo: Path, grid: Path, params: Path, out: Path, rev: str | list[str] = "HEAD") -> dict[str, Any]:
    """`far claims`: the grid's experiments derived from commit(s) `rev` (`dvc exp show --json --rev ...`) in
    `repo` -> `out` and claims.json. Experiments belong to the commit they ran from: after a later commit, name
    it; a grid run across commits names each."""
    from pipelines.ablation import experiment_metrics, load_grid
    from pipelines.dvc_cli import run_quiet

    experiments = load_grid(grid, params)
    groups: dict[str, list[str]] = {}
    for e in experiments:
        groups.setdefault(e.group, []).append(e.name)
    from far.claims_grid import experiment_revs, write_grid
    from far.report import write_claims_page

    revs = [rev] if isinstance(rev, str) else list(rev)
    commits = [_commit(repo, r) for r in revs]
    show = json.loads(run_quiet(["exp", "show", "--json", *(a for r in revs for a in ("--rev", r))], repo,
                                "`dvc exp show`"))
    # `dvc exp show` lists the baselines newest first; the first --rev named that finished a name wins it
    show = sorted(show, key=lambda b: next((i for i, c in enumerate(commits)
                                            if c and str(b.get("rev", "")).startswith(c)), len(commits)))
    runs = experiment_metrics(show, {e.name for e in experiments})
    if not runs:
        print(f"far claims: no experiment of the grid derives from {', '.join(revs)}; `dvc exp list --all-commits` "
              "lists the commits that have them: `far claims --rev <commit>`", file=sys.stderr)
    claims = write_claims(runs, groups, out, source=", ".join(filter(None, commits)))
    write_grid(repo, experiment_revs(show), groups, out.with_suffix(""))
    write_claims_page(out, out.with_suffix(".html"))
    return claims
