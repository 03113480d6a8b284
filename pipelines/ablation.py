"""The ablation grid (ablations.yaml) and what `dvc exp show --json` says about its experiments.

A variant is a name and a set of params.yaml overrides (`key.path: value`), queued as
`dvc exp run --queue -n <name> -S key.path=value ...`. With `seeds:` (values of `train.seed`, at the top of
the grid or inside a variant, which then runs only those) every variant runs once per seed, as the experiment
`<variant>-s<seed>` with `-S train.seed=<seed>`. The grid is validated against far/config.py before anything
is queued, so a typo fails at once, naming the variant and the key.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from far.config import ParamsError, load_params
from far.errors import InvalidInputError
from pipelines.dvc_cli import StageGraph

_NAME = re.compile(r"^[A-Za-z0-9+_.-]+$")  # git ref-safe; "+fusion" is fine
SEED_KEY = "train.seed"  # what `seeds:` sets: the training seed (sampling seeds stay sample.seeds)


@dataclass(frozen=True)
class Variant:
    """One experiment: `name` is `<variant>-s<seed>` when the grid has seeds, else the variant's name."""

    name: str
    overrides: dict[str, Any]  # params.yaml key path -> value (with train.seed when seeded)
    variant: str = ""  # the grid's variant name ("" = `name`)
    seed: int | None = None  # train.seed of this experiment, None when the grid has no seeds

    @property
    def group(self) -> str:
        return self.variant or self.name

    def set_args(self) -> list[str]:
        """`-S key=value` arguments; values as JSON, which DVC parses as YAML (0.1, true, "text", [1, 2])."""
        args: list[str] = []
        for key, value in self.overrides.items():
            args += ["-S", f"{key}={json.dumps(value)}"]
        return args

    def describe(self) -> str:
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in self.overrides.items()) or "(params.yaml as is)"


def set_param(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set the dotted params.yaml `key` (list items by index: `concepts.0.token`) of parsed `data` in place;
    a key that is not there is an InvalidInputError naming `where` it came from."""
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        index: Any = int(part) if isinstance(node, list) and part.isdigit() else part
        try:
            node = node[index]
        except (KeyError, IndexError, TypeError):
            raise InvalidInputError(f"{where}: {'.'.join(parts[: i + 1])!r} is not in params.yaml") from None
    last = parts[-1]
    if isinstance(node, list) and last.isdigit():
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise InvalidInputError(f"{where}: {key!r} does not name a params.yaml key")


def _seeds(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value or len(set(value)) != len(value)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise InvalidInputError(f"{where}: `seeds` must be a non-empty list of distinct integers >= 0 "
                                f"(values of {SEED_KEY}), got {value!r}")
    return value


def load_grid(path: Path, params: Path) -> list[Variant]:
    """Read, expand (variant x seed) and validate the grid: each experiment's params must load cleanly."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: ablation grid not found") from None
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path}: not valid YAML ({exc})") from None
    variants = raw.get("variants") if isinstance(raw, dict) else None
    if not isinstance(variants, dict) or not variants:
        raise InvalidInputError(f"{path}: expected `variants:` mapping names to params overrides")
    seeds = _seeds(raw.get("seeds"), f"{path}: seeds")
    base = yaml.safe_load(params.read_text())
    grid: list[Variant] = []
    for name, overrides in variants.items():
        where = f"{path}: variant {name!r}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidInputError(f"{where}: names may use letters, digits and + _ . - only")
        overrides = {} if overrides is None else overrides
        if not isinstance(overrides, dict):
            raise InvalidInputError(f"{where}: expected a mapping of params key paths to values")
        overrides = dict(overrides)
        own = _seeds(overrides.pop("seeds", None), f"{where}: seeds")
        if own is not None and seeds is None:
            raise InvalidInputError(f"{where}: `seeds` restricts the grid's seeds; set `seeds:` at the top first")
        if own is not None and (extra := sorted(set(own) - set(seeds or []))):
            raise InvalidInputError(f"{where}: seeds {extra} are not in the grid's seeds {seeds}")
        if seeds is not None and SEED_KEY in overrides:
            raise InvalidInputError(f"{where}: {SEED_KEY} is set by `seeds:`; do not override it in a variant")
        overrides = {str(k): v for k, v in overrides.items()}
        for i, seed in enumerate(own or seeds or [None]):
            run = overrides if seed is None else {**overrides, SEED_KEY: seed}
            if i == 0:  # the seeds differ in train.seed only (checked above): one validation per variant
                data = copy.deepcopy(base)
                for key, value in run.items():
                    set_param(data, key, value, where)
                _validate(data, params.parent, where)
            label = name if seed is None else f"{name}-s{seed}"
            grid.append(Variant(label, run, variant=name, seed=seed))
    names = [v.name for v in grid]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidInputError(f"{path}: experiment names {dupes} occur twice (a variant named like "
                                "<variant>-s<seed>?)")
    return grid


def _validate(data: dict[str, Any], root: Path, where: str) -> None:
    # load_params is the one validator. It checks concept folders relative to the cwd, so the copy it
    # reads names them from the project root instead (the queued experiment runs there).
    data = copy.deepcopy(data)
    for subject in (data.get("concepts") or {}).get("subjects") or []:
        if isinstance(subject, dict) and isinstance(subject.get("images"), str):
            subject["images"] = str(root / subject["images"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            load_params(path)
        except ParamsError as exc:
            raise InvalidInputError(f"{where}: {str(exc).removeprefix(f'{path}: ')}") from None


def touched_stages(graph: StageGraph, stage_params: dict[str, list[str]], grid: list[Variant]) -> set[str]:
    """Stages some variant changes: those reading an overridden key, and everything downstream of them."""
    keys = {k for v in grid for k in v.overrides}

    def reads(stage: str, key: str) -> bool:
        return any(key == p or key.startswith(p + ".") or p.startswith(key + ".")
                   for p in stage_params.get(stage, []))

    direct = {s for s in graph.order if any(reads(s, k) for k in keys)}
    return graph.downstream(direct)


# ----------------------------------------------------------------------------------------- results
def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def experiment_metrics(show: list[dict[str, Any]], names: set[str]) -> dict[str, dict[str, Any]]:
    """{experiment name: {"rev", "state", "metrics" (flat), "error"}} from `dvc exp show --json`."""
    found: dict[str, dict[str, Any]] = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            name = exp.get("name")
            # the first baseline listed that has it finished wins (a failed try under a later commit is no result)
            if name not in names or not exp.get("revs") or found.get(name, {}).get("state") == "success":
                continue
            rev = exp["revs"][0]
            metrics: dict[str, Any] = {}
            errors: list[str] = []
            files = (rev.get("data") or {}).get("metrics") or {}
            for file, content in files.items():
                if "error" in content:
                    errors.append(f"{file}: {content['error'].get('msg', content['error'])}")
                    continue
                prefix = "" if len(files) == 1 else f"{file}:"
                metrics.update({prefix + k: v for k, v in flatten(content.get("data", {})).items()})
            executor = exp.get("executor") or {}
            found[name] = {"rev": rev.get("rev", "")[:7], "state": executor.get("state") or "success",
                           "metrics": metrics, "error": "; ".join(errors) or (rev.get("error") or None)}
    return found


def expected_params(base: dict[str, Any], variant: Variant) -> dict[str, Any]:
    """The flat params.yaml an experiment of `variant` runs with: `base` (params.yaml) plus its overrides."""
    data = copy.deepcopy(base)
    for key, value in variant.overrides.items():
        set_param(data, key, value, f"variant {variant.name!r}")
    return flatten(data)


def finished(show: list[dict[str, Any]], grid: list[Variant], base: dict[str, Any]) -> set[str]:
    """Experiments of the grid that need no re-run: listed by `dvc exp show --json` (which lists the current
    commit's experiments), finished without error, with exactly the params.yaml the grid gives them now.

    A changed param (in params.yaml or in the grid) or a failed run makes it pending again. Code changes are
    seen through the commit: commit them, and the old commit's experiments are no longer listed.
    """
    wanted = {v.name: v for v in grid}
    done: set[str] = set()
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            name, revs = exp.get("name"), exp.get("revs") or []
            if name not in wanted or not revs or (exp.get("executor") or {}).get("state") not in (None, "success"):
                continue
            rev = revs[0]
            data = rev.get("data") or {}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            metrics = data.get("metrics") or {}
            if rev.get("error") or not metrics or any("error" in m for m in metrics.values()):
                continue
            if flatten(params) == expected_params(base, wanted[name]):
                done.add(name)
    return done


def result_rows(variants: list[Variant], outcome: dict[str, Any], metrics: dict[str, dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """One row per variant: queue outcome (state, stages run / from cache) joined with its metrics."""
    rows: list[dict[str, Any]] = []
    for v in variants:
        exp, run = metrics.get(v.name, {}), outcome[v.name]
        rows.append({"variant": v.name, "experiment": exp.get("rev", "-"), "state": run["status"],
                     "overrides": v.describe(), "metrics": exp.get("metrics", {}), "ran": run["ran"],
                     "skipped": run["skipped"], "error": run["error"] or exp.get("error")})
    return rows


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows flattened for a Prefect table artifact (one column per metric)."""
    return [{"variant": r["variant"], "experiment": r["experiment"], "state": r["state"],
             "overrides": r["overrides"], **r["metrics"], "stages_run": len(r["ran"]),
             "stages_from_cache": len(r["skipped"])} for r in rows]


def markdown(rows: list[dict[str, Any]], metric_keys: list[str]) -> str:
    """reports/ablations.md: one row per variant: overrides, metrics, stages run vs taken from the cache."""
    head = ["variant", "experiment", "state", "overrides", *metric_keys, "stages run", "stages from cache"]
    lines = ["# Ablations", "",
             "One DVC experiment per variant of `ablations.yaml` (`dvc exp run --queue`, then `dvc queue start`).",
             "A stage *from cache* was skipped by DVC (unchanged, or restored from the run-cache).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [f"`{r['variant']}`", r["experiment"], r["state"], r["overrides"],
                  *[_fmt(r["metrics"].get(k)) for k in metric_keys],
                  f"{len(r['ran'])}: {', '.join(r['ran']) or '-'}",
                  f"{len(r['skipped'])}: {', '.join(r['skipped']) or '-'}"]
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |")
    errors = [f"- `{r['variant']}`: {r['error']}" for r in rows if r.get("error")]
    if errors:
        lines += ["", "Problems:", *errors]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
