"""Concept Fusion throughput: examples/s at 512 px end to end (inputs loaded, composed, encoded, into Parquet).

Inputs (not timed): the shipped concepts segmented by the `segment` stage code, and class priors from the tiny
base model. Timed: `python -m stages.fuse` exactly as dvc runs it, wall clock of the whole process (interpreter
start and imports, loading + precomputing backgrounds, composing with `fusion.workers` processes, JPEG images +
PNG masks, streaming row groups into train.parquet, preview, summary), once with the configured
`fusion.workers` (the reported `examples_per_s`) and once in-process (`workers: 0`) for comparison.
For scale, the same kind of example is also made the plain way (PIL paste of the cut-out on a background,
default PNG encode), which is what the target (>= 100 examples/s) is compared against.

    python bench/fuse.py [--single 300] [--multi 500] [--resolution 512]

Writes reports/bench/fuse.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # params.yaml's concept folders are relative to the project root

from far.config import load_params  # noqa: E402
from far.io import write_json  # noqa: E402


def prepare_inputs(work: Path) -> tuple[Path, Path]:
    """Segment the shipped concepts and generate priors with the tiny base model (not timed)."""
    from far.models import load_base_pipeline, prepare_base_model
    from far.priors import write_priors
    from far.segment import segment_concepts

    p = load_params(ROOT / "params.yaml")
    segment_concepts(p.concepts, p.segment, work / "segmented")
    prepare_base_model(p.model, work / "base")
    write_priors(load_base_pipeline(work / "base"), work / "priors", p.concepts, p.priors, p.segment)
    return work / "segmented", work / "priors"


def plain_pil_rate(segmented: Path, side: int, n: int) -> float:
    """Examples/s of the naive way: PIL open cut-out, resize, paste on a resized background, PNG save (default)."""
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(segmented / "manifest.parquet").to_pylist()
    start = time.perf_counter()
    for i in range(n):
        row, bg_row = rows[i % len(rows)], rows[(i + 1) % len(rows)]
        cut = Image.open(segmented / row["cutout"]).convert("RGBA")
        cut = cut.resize((side // 2, round(side / 2 * cut.height / cut.width)))
        bg = Image.open(segmented / bg_row["image"]).convert("RGB").resize((side, side))
        bg.paste(cut, (side // 4, side // 4), cut)
        mask = Image.new("L", (side, side))
        mask.paste(cut.getchannel("A"), (side // 4, side // 4))
        for im in (bg, mask):
            im.save(io.BytesIO(), format="PNG")
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", type=int, default=300)
    ap.add_argument("--multi", type=int, default=500)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "fuse.json")
    args = ap.parse_args()

    import yaml

    params = load_params(ROOT / "params.yaml")
    results = []
    with tempfile.TemporaryDirectory(prefix="far-bench-fuse-") as tmp:
        segmented, priors = prepare_inputs(Path(tmp))
        for workers in (params.fusion.workers, 0):
            raw = yaml.safe_load((ROOT / "params.yaml").read_text())
            raw["model"]["resolution"] = args.resolution
            raw["fusion"].update(num_single=args.single, num_multi=args.multi, workers=workers)
            variant = Path(tmp) / f"params-{workers}.yaml"
            variant.write_text(yaml.safe_dump(raw, sort_keys=False))
            out = Path(tmp) / f"fusion-{workers}"
            # the stage exactly as dvc runs it: a fresh interpreter, imports and worker start-up included
            cmd = [sys.executable, "-m", "stages.fuse", "--segmented", str(segmented), "--priors", str(priors),
                   "--out", str(out), "--params", str(variant)]
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "CI": "true"})
            seconds = time.perf_counter() - start
            summary = json.loads((out / "summary.json").read_text())
            size = (out / "train.parquet").stat().st_size
            results.append({"workers": workers, "examples": summary["rows"], "kinds": summary["kinds"],
                            "seconds": round(seconds, 3), "examples_per_s": round(summary["rows"] / seconds, 1),
                            "parquet_mb": round(size / 1e6, 2)})
            print(f"workers={workers}: {summary['rows']} examples in {seconds:.2f} s = "
                  f"{summary['rows'] / seconds:.1f} examples/s ({size / 1e6:.1f} MB)")
        baseline = plain_pil_rate(segmented, args.resolution, 40)
        print(f"plain PIL paste + default PNG: {baseline:.1f} examples/s")
    record = {
        "examples_per_s": results[0]["examples_per_s"],  # the configured worker count: how the stage runs
        "resolution": args.resolution,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine lowers the figure
        "image_format": params.fusion.image_format,
        "runs": results,
        "plain_pil_paste_png_examples_per_s": round(baseline, 1),
        "target_examples_per_s": 100,
        "command": "python bench/fuse.py " + " ".join(sys.argv[1:]),
    }
    write_json(args.out, record)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
