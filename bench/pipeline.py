"""Time the embedded default pipeline stage by stage, as a new user meets it.

    python bench/pipeline.py            # -> reports/bench/pipeline.json
    python bench/pipeline.py --params configs/dreambench-tiny.yaml --out reports/bench/pipeline-tiny.json

Clones the committed project (HEAD) into a temporary directory, then runs `dvc repro --single-item <stage>`
for every stage in graph order under `/usr/bin/time -v`, recording wall seconds and peak RSS of each
(the stage's own process tree: DVC plus the stage command). Installation is not included. `--params` copies
another parameter file over the clone's params.yaml first (the tiny default of before, to compare on one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["base_model", "segment", "priors", "fuse", "train", "sample", "evaluate", "report"]


def _env() -> dict[str, str]:
    env = dict(os.environ, CI="true", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _clone(dest: Path) -> None:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)


def _timed(cmd: list[str], cwd: Path) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(rss_kib / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=None, help="parameter file to run instead of params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/bench/pipeline.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="far-bench-") as tmp:
        project = Path(tmp) / "far"
        _clone(project)
        if args.params is not None:
            shutil.copyfile(args.params, project / "params.yaml")
        stages = {stage: _timed([sys.executable, "-m", "dvc", "repro", "--single-item", stage], project)
                  for stage in STAGES}
        again = _timed([sys.executable, "-m", "dvc", "repro"], project)
    result = {
        "command": "python bench/pipeline.py" + (f" --params {args.params}" if args.params else ""),
        "params": str(args.params or "params.yaml"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "stages": stages,
        "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
        "max_peak_rss_mib": max(s["peak_rss_mib"] for s in stages.values()),
        "repro_again_seconds": again["seconds"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
