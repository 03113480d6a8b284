"""The world oracle's reading of each sample for the report: read from `reports/eval/world.csv`, drawn as boxes.

Each subject the oracle found gets a box coloured by what it is (a concept, a mix of the prompt's two concepts,
any other subject) and a caption line of its class and attributes. Configurations without the world verdict
have no world.csv and get nothing from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from far import report_assets as pics
from far.errors import InvalidInputError

# reports/eval/world.csv (far/world/verdict.py image_rows): the columns the report reads, and each subject's keys.
WORLD_COLUMNS = ("path", "oracle_background", "subjects")
SUBJECT_KEYS = ("cls", "body", "part", "pattern", "bbox", "confidence", "is")
ORACLE_LEGEND = {"concept": "a concept", "mix": "a mix of the prompt's two concepts", "other": "any other subject"}


def read_world(eval_dir: Path | None) -> dict[str, dict[str, Any]]:
    """The world oracle's reading of each sample, by the sample's file name, from `<eval>/world.csv`:
    {"background": str, "subjects": [{cls, body, part, pattern, bbox, confidence, is}]}. {} without the file
    (a configuration without the world verdict)."""
    path = eval_dir / "world.csv" if eval_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure names the file
        raise InvalidInputError(f"{path}: not a readable CSV file ({exc})") from None
    lacking = [c for c in WORLD_COLUMNS if c not in df.columns]
    if lacking:
        raise InvalidInputError(f"{path}: no column {', '.join(lacking)} (the `evaluate` stage's world verdict "
                                "writes it: re-run `evaluate`)")
    readings = {}
    for line, row in enumerate(df[list(WORLD_COLUMNS)].itertuples(index=False), start=2):  # line 1: the header
        where = f"{path}: line {line} ({row.path}), column subjects"
        try:
            subjects = json.loads(row.subjects)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(subjects, list) or not all(map(_is_subject, subjects)):
            raise InvalidInputError(f"{where}: expected a JSON list of subjects, each with {', '.join(SUBJECT_KEYS)} "
                                    "(bbox: [x0, y0, x1, y1])")
        readings[Path(row.path).name] = {"background": row.oracle_background, "subjects": subjects}
    return readings


def _is_subject(x: Any) -> bool:
    return (isinstance(x, dict) and set(SUBJECT_KEYS) <= x.keys() and isinstance(x["bbox"], list)
            and len(x["bbox"]) == 4 and all(isinstance(v, int | float) for v in x["bbox"]))


def _what(label: str) -> str:
    """The box colour's key of a subject's `is`: a concept's name, `mix:<a>+<b>` or ''."""
    return "other" if not label else "mix" if label.startswith("mix:") else "concept"


def oracle_figure(rgb: np.ndarray, reading: dict[str, Any], assets: Path, rel: str, name: str,
                  size: int) -> dict[str, Any]:
    """Write `rgb` (the full-size sample) with the oracle's boxes, enlarged to `size`, to `assets/name`;
    returns the figure for the page: its src, the background and a caption line per subject."""
    found = [(x, pics.BOX_COLOURS[_what(x["is"])]) for x in reading["subjects"]]
    pics.save_jpeg(pics.boxes(rgb, [(x["bbox"], colour) for x, colour in found], size), assets / name)
    lines = [{"text": f"{x['cls']} {x['body']}/{x['part']} {x['pattern']}" + (f" = {x['is']}" if x["is"] else ""),
              "rgb": colour, "confidence": f"{float(x['confidence']):.4g}"} for x, colour in found]
    return {"src": f"{rel}/{name}", "background": reading["background"], "subjects": lines}
