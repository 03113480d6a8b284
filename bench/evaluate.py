"""Evaluate throughput: images/s of the metric pass (CLIP-T, CLIP-I, DINO, identity crops, leakage) on the
default backbones of params.yaml (`eval.clip_model`, `eval.dino_model`; `tiny` offline).

Inputs (not timed): `data/samples` and `data/segmented` when the pipeline has produced them, else stand-ins
built from the shipped photos (references segmented by the `segment` stage code; "generated" images = the
photos, a third of them two-subject composites with constructed attention maps, see tests/_eval_inputs.py).
Timed: `far.metrics.evaluate` exactly as the stage runs it, after the backbones are loaded (load time is
reported on its own). One untimed warm-up pass on a few images comes first.

    python bench/evaluate.py [--seeds 32] [--repeats 3]

Writes reports/bench/evaluate.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # params.yaml's concept folders are relative to the project root

from far.config import load_params  # noqa: E402
from far.io import write_json  # noqa: E402


def prepare_inputs(work: Path, seeds: int) -> tuple[Path, Path, str]:
    """Real stage outputs if present, else stand-ins from data/concepts (3 prompts x `seeds` images)."""
    samples, segmented = ROOT / "data" / "samples", ROOT / "data" / "segmented"
    if (samples / "manifest.parquet").is_file() and (segmented / "manifest.parquet").is_file():
        return samples, segmented, "data/samples + data/segmented (pipeline outputs)"
    from far.segment import segment_concepts
    from tests._eval_inputs import make_samples

    p = load_params(ROOT / "params.yaml")
    segment_concepts(p.concepts, p.segment, work / "segmented")
    make_samples(work / "samples", seeds=tuple(range(seeds)))
    return work / "samples", work / "segmented", (
        f"stand-ins from data/concepts: {3 * seeds} 256 px images (1/3 two-subject), references segmented "
        f"with segment.backend={p.segment.backend}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=32, help="stand-in images per prompt (3 prompts)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "evaluate.json")
    args = parser.parse_args()

    import torch

    from far.backbones import load_clip, load_dino, pick_device
    from far.metrics import evaluate
    from tests._eval_inputs import make_samples

    params = load_params(ROOT / "params.yaml")
    cfg = params.eval
    with tempfile.TemporaryDirectory(prefix="far-bench-eval-") as tmp:
        work = Path(tmp)
        samples, segmented, inputs = prepare_inputs(work, args.seeds)
        device = pick_device(cfg.device)
        start = time.perf_counter()
        backbones = (load_clip(cfg.clip_model, work, device, cfg.tiny_seed),
                     load_dino(cfg.dino_model, work, device, cfg.tiny_seed))
        load_seconds = time.perf_counter() - start
        warm = make_samples(work / "warmup", seeds=(0,))
        evaluate(warm, segmented, params.concepts, cfg, work, backbones=backbones)
        runs = []
        for _ in range(args.repeats):
            cpu = time.process_time()
            metrics, _, run = evaluate(samples, segmented, params.concepts, cfg, work, backbones=backbones)
            runs.append(run | {"cpu_seconds": time.process_time() - cpu})
    seconds = statistics.median(r["metric_seconds"] for r in runs)
    images = runs[0]["images"]
    result = {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 2),
        "seconds_all_repeats": [round(r["metric_seconds"], 3) for r in runs],
        # CPU time of this process (all its threads) per pass: robust to other jobs sharing the cores
        "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in runs), 3),
        "images_per_cpu_second": round(images / statistics.median(r["cpu_seconds"] for r in runs), 2),
        "backbone_load_seconds": round(load_seconds, 3),
        "embeddings_per_pass": {k: runs[0][f"embeddings_computed_{k}"] for k in ("clip", "dino")},
        "identity_crops": runs[0]["identity_crops"],
        "backbones": {k: runs[0]["backbones"][k] for k in ("clip", "dino", "subject_finder")},
        "batch_size": cfg.batch_size,
        "inputs": inputs,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other jobs on the machine slow every number
        "machine": platform.processor() or platform.machine(),
        "command": "python bench/evaluate.py " + " ".join(sys.argv[1:]),
    }
    write_json(args.out, result)
    print(f"evaluate bench: {images} images in {seconds:.2f} s = {result['images_per_second']} images/s "
          f"({device}, batch {cfg.batch_size}; backbones loaded in {load_seconds:.2f} s) -> {args.out}")


if __name__ == "__main__":
    main()
