#!/usr/bin/env bash
# GPU speed check (issue 15, item 6), one prepared run of under 5 minutes; writes reports/bench/gpu.json.
#
#   bench/gpu.sh              on a machine with a CUDA GPU (named from nvidia-smi in the report):
#     1. training: SD 2.1-architecture UNet + OpenCLIP-H-sized text encoder, random weights, 512 px, bf16 autocast,
#        batch 4, gradient checkpointing, crossattn_kv + token rows; refine on vs off interleaved
#        (bench/train.py): images/s, peak CUDA memory per mode, refine overhead
#     2. sampling: the sample stage's far.sample.generate on the same architecture, 512 px, batch and steps of
#        params.yaml, fp32 as the stage runs it and bf16 (bench/sampling.py): images/s
#   bench/gpu.sh --dry-run    the same scripts on CPU with the tiny model and a few steps, to check that they run
#                             (its numbers mean nothing; the report goes to a temporary file unless OUT_JSON is set)
#
# Goals (issue 15): >= 100 training images/s on one H200, < 16 GB at batch 4, refine overhead <= 1.05.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ "${1:-}" = "--dry-run" ]; then
  GPU="none (dry run on CPU, tiny model: numbers are not results)"
  OUT=${OUT_JSON:-$TMP/gpu.json}
  TRAIN=(--device cpu --resolution 128 --batch-size 2 --gradient-checkpointing --dtype bf16 --steps 2 --block 1 --threads 1)
  SAMPLE=(--device cpu --resolution 128 --batch-size 2 --steps 2 --batches 1 --threads 1)
  LIMITS=(3600 3600 3600)  # no real limit: a shared CPU can be very slow
else
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: no GPU here (nvidia-smi fails); run bench/gpu.sh --dry-run to check the scripts on CPU" >&2
    exit 2
  fi
  GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
  OUT=${OUT_JSON:-reports/bench/gpu.json}
  TRAIN=(--device cuda --full-size --resolution 512 --batch-size 4 --gradient-checkpointing --dtype bf16 --steps 20 --block 5)
  SAMPLE=(--device cuda --full-size --resolution 512 --batches 3)
  LIMITS=(170 60 55)  # seconds; 285 in all
fi
echo "GPU: $GPU"
status=()
timeout "${LIMITS[0]}" "$PY" bench/train.py "${TRAIN[@]}" --out "$TMP/train.json"; status+=("train:$?")
timeout "${LIMITS[1]}" "$PY" bench/sampling.py "${SAMPLE[@]}" --dtype fp32 --out "$TMP/sampling_fp32.json"; status+=("sampling_fp32:$?")
timeout "${LIMITS[2]}" "$PY" bench/sampling.py "${SAMPLE[@]}" --dtype bf16 --out "$TMP/sampling_bf16.json"; status+=("sampling_bf16:$?")

"$PY" - "$GPU" "$TMP" "$OUT" "${status[@]}" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

gpu, tmp, out, *status = sys.argv[1:]
def part(name):
    p = Path(tmp) / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
train = part("train")
report = {
    "gpu": gpu, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit,
    "exit_status": dict(s.split(":") for s in status),  # 124: that part ran past its time limit
    "train": train, "sampling_fp32": part("sampling_fp32"), "sampling_bf16": part("sampling_bf16"),
    "goals": {"train_images_per_s": 100, "peak_memory_gib_batch4": 16, "refine_overhead_ratio": 1.05},
}
if train:
    report["headline"] = {
        "train_images_per_s_refine_on": train["images_per_s"]["on"],
        "peak_memory_gib_refine_on": round(train["peak_memory_mib"]["on"] / 1024, 2),
        "refine_overhead_ratio": train["refine_overhead_ratio"],
    }
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(report, indent=1) + "\n")
print(json.dumps({k: report.get(k) for k in ("gpu", "exit_status", "headline")}, indent=1))
print(f"-> {out}")
EOF
