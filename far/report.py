"""The report stage: one static HTML page (`reports/index.html`) with every asset local (`reports/assets/`).

Sections: the metric backbones (prominent, so tiny-backbone numbers are never mistaken for real ones),
metric tables of this run and of every DVC experiment side by side, samples per prompt with each concept
token's attention map overlaid (and, in the world configuration, the world oracle's reading of each sample
from `reports/eval/world.csv`: its boxes and what each subject is), loss curves (dvclive), the fused training
examples, the references and their masks. Links are relative and nothing is fetched from the network, so the
page opens offline and can be copied or attached as a whole directory. A missing input leaves a visible note in
its section (and in the stage's summary); an unreadable one is an error naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from far import report_assets as pics
from far import report_world as world_view
from far.config import ReportConfig
from far.errors import InvalidInputError
from far.io import atomic_dir, write_text

TEMPLATE = "report.html.j2"
EXPERIMENTS_TEMPLATE = "experiments.html.j2"
CLAIMS_TEMPLATE = "claims.html.j2"
FUSION_KIND_ORDER = ("fusion", "single", "reference", "prior")  # most telling first
# The experiment table's first columns after the name (flattened metrics.json keys): the figures compared first.
HEADLINE = ("overall.clip_t", "overall.clip_i", "overall.dino", "multi_concept.identity_accuracy",
            "multi_concept.identity_mixing")


@dataclass
class Inputs:
    segmented: Path
    fusion: Path
    samples: Path
    metrics: Path
    live: Path
    eval: Path | None = None
    claims: Path | None = None  # reports/claims.md of `far claims`; shown when it exists (no DVC dependency)


@dataclass
class Context:
    """Everything the template shows; asset paths are relative to the page."""

    missing: list[str] = field(default_factory=list)
    backbones: list[tuple[str, str]] = field(default_factory=list)
    tiny_backbones: bool = False
    base_model: str | None = None
    metric_tables: list[dict[str, Any]] = field(default_factory=list)
    experiments: dict[str, Any] | None = None
    experiments_note: str = ""
    eval_tables: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    sample_info: dict[str, Any] = field(default_factory=dict)
    oracle_legend: list[tuple[str, tuple[int, int, int]]] = field(default_factory=list)  # set when a sample has one
    curves: list[dict[str, str]] = field(default_factory=list)
    live_summary: list[dict[str, Any]] = field(default_factory=list)
    fusion: list[dict[str, Any]] = field(default_factory=list)
    fusion_preview: str | None = None
    references: list[dict[str, Any]] = field(default_factory=list)
    claims_html: str | None = None  # reports/claims.md rendered
    claims_grid: dict[str, Any] | None = None  # the variants' samples side by side (far/claims_grid.py)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"  # metrics.json writes undefined scores (no multi-concept images, NaN) as null
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _scalar(v: Any) -> bool:
    return not isinstance(v, dict | list)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def metric_tables(obj: dict[str, Any], title: str) -> list[dict[str, Any]]:
    """Tables for one metrics.json section, whatever its nesting.

    Scalars -> a (metric, value) table; a mapping of mappings of scalars (per concept, per pair) -> a
    matrix with one row per key; deeper nesting recurses with the key path in the title.
    """
    tables: list[dict[str, Any]] = []
    scalars = {k: v for k, v in obj.items() if _scalar(v)}
    nested = {k: v for k, v in obj.items() if isinstance(v, dict)}
    if scalars:
        tables.append({"title": title, "columns": ["metric", "value"],
                       "rows": [[k, _fmt(v)] for k, v in scalars.items()]})
    matrix = {k: v for k, v in nested.items() if v and all(_scalar(x) for x in v.values())}
    if matrix:
        cols = list(dict.fromkeys(c for v in matrix.values() for c in v))
        tables.append({"title": title if not scalars else f"{title} (by key)", "columns": ["", *cols],
                       "rows": [[k, *[_fmt(v.get(c, "")) for c in cols]] for k, v in matrix.items()]})
    for k, v in nested.items():
        if k not in matrix:
            tables += metric_tables(v, f"{title} / {k}")
    return tables


def read_metrics(path: Path, ctx: Context) -> None:
    if not path.is_file():
        ctx.missing.append(f"{path} (run the `evaluate` stage)")
        return
    metrics = _read_json(path, "overall/per_concept/multi_concept")
    for section in ("overall", "per_concept", "multi_concept"):
        if isinstance(metrics.get(section), dict):
            ctx.metric_tables += metric_tables(metrics[section], section.replace("_", " "))
    others = {k: v for k, v in metrics.items() if k not in {"overall", "per_concept", "multi_concept"}}
    if others:
        ctx.metric_tables += metric_tables(others, "other")


def read_backbones(eval_dir: Path | None, ctx: Context) -> None:
    """The names of the metric backbones and the subject finder: `<eval>/backbones.json` (far.metrics writes it
    beside the tables; metrics.json holds numbers only). Tiny offline backbones raise the page's warning."""
    path = eval_dir / "backbones.json" if eval_dir is not None else None
    if path is None or not path.is_file():
        ctx.missing.append(f"{path or '<eval>/backbones.json'} (run the `evaluate` stage)")
        return
    backbones = flatten(_read_json(path, "the backbone names"))
    ctx.tiny_backbones = any("tiny" in str(v).lower() for k, v in backbones.items() if "sha" not in k)
    # hashes identify the exact weights; 12 hex digits are enough to tell runs apart on the page
    ctx.backbones = [(k, str(v)[:12] if "sha" in k and isinstance(v, str) else _fmt(v)) for k, v in backbones.items()]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{path}: expected a JSON object with {what}")
    return obj


# ---------------------------------------------------------------------------------------- experiments
def dvc_experiments(metrics: Path, cwd: Path, timeout: float = 120) -> tuple[dict[str, Any] | None, str]:
    """Every DVC experiment's metrics (and the params that differ) side by side, from `dvc exp show --json`.

    Returns (table or None, a note). None when DVC is unavailable, fails, or there is only this run.
    """
    try:
        proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`dvc exp show` did not run ({exc.__class__.__name__}); showing this run only"
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"`dvc exp show` failed ({first[:200]}); showing this run only"
    try:
        return experiments_table(json.loads(proc.stdout), metrics, cwd)
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        return None, f"`dvc exp show --json` output not understood ({exc}); showing this run only"


def experiments_table(commits: list[dict[str, Any]], metrics: Path, root: Path) -> tuple[dict[str, Any] | None, str]:
    """Rows (workspace, commits, experiments) x columns (headline metrics, params that differ, other metrics)."""
    try:
        key = os.path.relpath(metrics.resolve(), root.resolve())
    except ValueError:
        key = str(metrics)
    entries: list[tuple[str, dict[str, Any]]] = []
    for commit in commits:
        name = commit.get("name") or commit.get("rev", "?")[:7]
        entries.append((name if commit.get("rev") != "workspace" else "workspace (this run)", commit.get("data")))
        for exp in commit.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") == "running":
                continue  # the experiment now running is this run, already shown as the workspace
            revs = exp.get("revs") or []
            if revs:
                entries.append((exp.get("name") or revs[0].get("name") or revs[0]["rev"][:7], revs[0].get("data")))
    rows = []
    for name, data in entries:
        m = ((data or {}).get("metrics") or {}).get(key, {}).get("data")
        if not isinstance(m, dict):
            continue
        params = {}
        for file, p in ((data or {}).get("params") or {}).items():
            for k, v in flatten(p.get("data") or {}).items():
                params[k if file == "params.yaml" else f"{file}:{k}"] = v
        # DVC metrics are numbers: text an older commit's metrics.json still held (backbone names) is left out
        numbers = {k: v for k, v in flatten(m).items() if v is None or isinstance(v, int | float)}
        rows.append((name, params, numbers))
    if len(rows) < 2:
        return None, "only this run has metrics (no other DVC experiment or commit to compare)"
    pkeys = sorted({k for _, p, _ in rows for k in p if len({json.dumps(r[1].get(k)) for r in rows}) > 1})
    mkeys = list(dict.fromkeys(k for _, _, m in rows for k in m))
    head = [k for k in HEADLINE if k in mkeys]
    rest = [k for k in mkeys if k not in head]
    table = {"columns": ["experiment", *head, *pkeys, *rest], "n_head": len(head), "n_params": len(pkeys),
             "rows": [[n, *[_fmt(m.get(k, "")) for k in head], *[_fmt(p.get(k, "")) for k in pkeys],
                       *[_fmt(m.get(k, "")) for k in rest]] for n, p, m in rows]}
    return table, (f"{len(rows)} runs with metrics; the headline metrics first, then only the params that differ, "
                   "then every other metric")


# ---------------------------------------------------------------------------------------------- parts
def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure names the file
        raise InvalidInputError(f"{path}: not a readable Parquet file ({exc})") from None


def add_references(segmented: Path, assets: Path, rel: str, size: int, ctx: Context) -> None:
    manifest = segmented / "manifest.parquet"
    if not manifest.is_file():
        ctx.missing.append(f"{manifest} (run the `segment` stage)")
        return
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    df = _read_parquet(manifest)
    for row in df.to_dict("records"):
        stem = _safe(Path(row["image"]).stem)
        rgb = pics.fit(pics.load_rgb(segmented / row["image"]), size)
        mask = pics.fit(np.asarray(pics.Image.open(segmented / row["mask"]).convert("L")), size) >= 128
        concept = _safe(str(row["concept"]))
        pics.save_jpeg(rgb, assets / "refs" / concept / f"{stem}.jpg")
        pics.save_jpeg(pics.outline(rgb, [mask]), assets / "refs" / concept / f"{stem}_outline.jpg")
        groups[str(row["concept"])].append({
            "image": f"{rel}/refs/{concept}/{stem}.jpg", "outline": f"{rel}/refs/{concept}/{stem}_outline.jpg",
            "name": Path(row["image"]).name, "quality": row.get("quality", ""),
            "area": _fmt(float(row["area_fraction"])) if "area_fraction" in row else "",
            "backend": row.get("backend", ""),
        })
    classes = dict(zip(df["concept"].astype(str), df.get("class_word", df["concept"]).astype(str), strict=False))
    ctx.references = [{"concept": c, "class_word": classes.get(c, ""), "photos": items} for c, items in groups.items()]


def add_fusion(fusion: Path, assets: Path, rel: str, cfg: ReportConfig, ctx: Context) -> None:
    from far.dataset import decode_image, decode_mask, iter_rows

    parquet = fusion / "train.parquet"
    if (fusion / "preview.png").is_file():
        rgb = pics.fit(pics.load_rgb(fusion / "preview.png"), 1600)
        pics.save_jpeg(rgb, assets / "fusion" / "preview.jpg")
        ctx.fusion_preview = f"{rel}/fusion/preview.jpg"
    if not parquet.is_file():
        ctx.missing.append(f"{parquet} (run the `fuse` stage)")
        return
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in iter_rows(parquet, columns=["id", "kind", "prompt", "concepts"]):
        by_kind[row["kind"]].append(row)
    order = [k for k in FUSION_KIND_ORDER if k in by_kind] + [k for k in by_kind if k not in FUSION_KIND_ORDER]
    picked: list[str] = []
    while len(picked) < cfg.fusion_preview and any(by_kind[k] for k in order):  # round robin over kinds
        for k in order:
            if by_kind[k] and len(picked) < cfg.fusion_preview:
                picked.append(by_kind[k].pop(0)["id"])
    wanted = set(picked)
    rows = {r["id"]: r for r in iter_rows(parquet) if r["id"] in wanted}
    for i, rid in enumerate(picked):
        r = rows[rid]
        rgb = decode_image(r["image"])
        masks = [decode_mask(m) for m in r["masks"]]
        img = pics.fit(pics.outline(rgb, masks), cfg.thumbnail_size)
        pics.save_jpeg(img, assets / "fusion" / f"{i:03d}.jpg")
        ctx.fusion.append({"src": f"{rel}/fusion/{i:03d}.jpg", "kind": r["kind"], "prompt": r["prompt"],
                           "concepts": [(c, pics.PALETTE[j % len(pics.PALETTE)]) for j, c in enumerate(r["concepts"])]})


def add_curves(live: Path, assets: Path, rel: str, ctx: Context) -> None:
    plots = live / "plots" / "metrics"
    if (live / "metrics.json").is_file():
        summary = flatten(json.loads((live / "metrics.json").read_text()))
        ctx.live_summary = [{"name": k, "value": _fmt(v)} for k, v in summary.items()]
    files = sorted(plots.rglob("*.tsv")) if plots.is_dir() else []
    if not files:
        ctx.missing.append(f"{plots}/*.tsv (run the `train` stage: dvclive writes the loss curves)")
    for f in files:
        name = f.relative_to(plots).with_suffix("").as_posix()
        df = pd.read_csv(f, sep="\t")
        ycol = f.stem if f.stem in df.columns else next((c for c in df.columns if c not in {"step", "timestamp"}), None)
        if ycol is None or df.empty:
            continue
        x = df["step"].to_numpy() if "step" in df.columns else np.arange(len(df))
        png = f"curves/{_safe(name)}.png"
        pics.loss_curve(x, df[ycol].to_numpy(dtype=np.float64), name, assets / png)
        ctx.curves.append({"src": f"{rel}/{png}", "title": name, "last": _fmt(float(df[ycol].iloc[-1])),
                           "steps": str(len(df))})


def add_samples(samples: Path, assets: Path, rel: str, cfg: ReportConfig, ctx: Context,
                world: dict[str, dict[str, Any]] | None = None) -> None:
    """Samples per prompt with their attention overlays; `world` (far/report_world.py `read_world`): the
    oracle's reading of each, shown beside."""
    manifest = samples / "manifest.parquet"
    if not manifest.is_file():
        ctx.missing.append(f"{manifest} (run the `sample` stage)")
        return
    if (samples / "sample.json").is_file():
        info = json.loads((samples / "sample.json").read_text())
        params = info.get("params") or {}
        ctx.sample_info = {"images": info.get("images", "?"), "scheduler": info.get("scheduler", "?"),
                           "steps": params.get("num_inference_steps", "?"),
                           "guidance": params.get("guidance_scale", "?"), "side": info.get("attention_side", "?")}
        ctx.base_model = info.get("base_model")
    df = _read_parquet(manifest).sort_values(["prompt_idx", "seed"])
    for idx, group in df.groupby("prompt_idx", sort=True):
        first = group.iloc[0]
        entry = {"idx": int(idx), "prompt": first["prompt"], "kind": first["kind"], "concepts": list(first["concepts"]),
                 "seeds": []}
        for row in group.head(cfg.max_samples_per_prompt).to_dict("records"):
            stem = _safe(Path(row["path"]).stem)
            full = pics.load_rgb(samples / row["path"])
            rgb = pics.fit(full, cfg.thumbnail_size)
            pics.save_jpeg(rgb, assets / "samples" / f"{stem}.jpg")
            oracle = None
            if (reading := (world or {}).get(Path(row["path"]).name)) is not None:
                oracle = world_view.oracle_figure(full, reading, assets, rel, f"oracle/{stem}.jpg", cfg.thumbnail_size)
                ctx.oracle_legend = [(world_view.ORACLE_LEGEND[k], colour) for k, colour in pics.BOX_COLOURS.items()]
            overlays = []
            for concept, token, npy in zip(row["concepts"], row["tokens"], row["attention"], strict=True):
                path = samples / npy
                if not path.is_file():
                    raise InvalidInputError(f"{manifest}: attention map {npy} of {row['path']} does not exist")
                heat = pics.heat_overlay(rgb, np.load(path), cfg.overlay_alpha)
                pics.save_jpeg(heat, assets / "attn" / f"{stem}_{_safe(concept)}.jpg")
                overlays.append({"concept": concept, "token": token, "src": f"{rel}/attn/{stem}_{_safe(concept)}.jpg"})
            entry["seeds"].append({"seed": int(row["seed"]), "src": f"{rel}/samples/{stem}.jpg", "overlays": overlays,
                                   "oracle": oracle})
        ctx.samples.append(entry)


def add_eval_tables(eval_dir: Path | None, ctx: Context, max_rows: int = 60) -> None:
    """Per-prompt tables the evaluate stage writes (any .csv/.tsv in reports/eval), first rows of each."""
    if eval_dir is None or not eval_dir.is_dir():
        return
    for f in sorted([*eval_dir.rglob("*.csv"), *eval_dir.rglob("*.tsv")]):
        df = pd.read_csv(f, sep="\t" if f.suffix == ".tsv" else ",")
        ctx.eval_tables.append({"title": f.relative_to(eval_dir).as_posix(), "columns": list(map(str, df.columns)),
                                "rows": [[_fmt(v) for v in r] for r in df.head(max_rows).itertuples(index=False)],
                                "more": max(0, len(df) - max_rows)})


def read_claims(claims: Path | None, assets: Path | None, rel: str, size: int, ctx: Context) -> None:
    """The Claims section: claims.md as HTML, and its sample grid (`<claims without .md>/grid.json`).

    `assets` None: link the grid's PNGs where they are (`rel` = their folder seen from the page), else copy them
    into `assets/claims` as thumbnails."""
    if claims is None or not claims.is_file():
        return
    from markdown_it import MarkdownIt

    ctx.claims_html = MarkdownIt("commonmark", {"html": False}).enable("table").render(claims.read_text())
    folder = claims.with_suffix("")
    if not (folder / "grid.json").is_file():
        return
    grid = _read_json(folder / "grid.json", "the claims' sample grid (far claims)")
    variants = []
    for v in grid.get("variants") or []:
        srcs: list[str | None] = []
        for f in v.get("images") or []:
            if f and assets is not None and (folder / f).is_file():
                pics.save_jpeg(pics.fit(pics.load_rgb(folder / f), size), assets / "claims" / f"{Path(f).stem}.jpg")
                srcs.append(f"{rel}/claims/{Path(f).stem}.jpg")
            else:
                srcs.append(f"{rel}/{f}" if f and (folder / f).is_file() else None)
        variants.append({"name": v.get("name", "?"), "experiment": v.get("experiment", ""), "images": srcs})
    ctx.claims_grid = {"prompts": grid.get("prompts") or [], "variants": variants, "missing": grid.get("missing") or []}


# ---------------------------------------------------------------------------------------------- build
def render(template: str = TEMPLATE, **values: Any) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(template).render(**values)


def build_report(inputs: Inputs, out: Path, assets: Path, cfg: ReportConfig, repo: Path | None = None) -> Context:
    """Write `out` (HTML) and `assets/` atomically; returns what was shown. `repo`: where to ask DVC."""
    rel = Path(os.path.relpath(assets.resolve(), out.resolve().parent)).as_posix()
    ctx = Context()
    with atomic_dir(assets) as tmp:
        read_metrics(inputs.metrics, ctx)
        read_backbones(inputs.eval, ctx)
        add_samples(inputs.samples, tmp, rel, cfg, ctx, world_view.read_world(inputs.eval))
        add_curves(inputs.live, tmp, rel, ctx)
        add_fusion(inputs.fusion, tmp, rel, cfg, ctx)
        add_references(inputs.segmented, tmp, rel, cfg.thumbnail_size, ctx)
        add_eval_tables(inputs.eval, ctx)
        read_claims(inputs.claims, tmp, rel, cfg.thumbnail_size, ctx)
        if cfg.experiments and repo is not None:
            ctx.experiments, ctx.experiments_note = dvc_experiments(inputs.metrics, repo)
        elif cfg.experiments:
            ctx.experiments_note = "no DVC repository given; showing this run only"
        html = render(ctx=ctx)  # before publishing anything: a template error leaves the old report intact
    write_text(out, html)
    return ctx


def write_experiments_page(metrics: Path, repo: Path, out: Path) -> tuple[dict[str, Any] | None, str]:
    """`out` (HTML): the experiment table of the report, fresh from `dvc exp show --json` in `repo`.

    Not a DVC output: experiments run after the `report` stage are no dependency of it, so this page is how
    the table follows them (`far report --experiments`) without touching the stage's outputs."""
    table, note = dvc_experiments(metrics, repo)
    write_text(out, render(EXPERIMENTS_TEMPLATE, table=table, note=note))
    return table, note


def write_claims_page(claims: Path, out: Path) -> Context:
    """`out` (HTML, beside claims.md): the Claims section alone, its images linked from claims.md's folder."""
    ctx = Context()
    folder = os.path.relpath(claims.with_suffix("").resolve(), out.resolve().parent)
    read_claims(claims, None, Path(folder).as_posix(), 0, ctx)
    write_text(out, render(CLAIMS_TEMPLATE, ctx=ctx))
    return ctx
