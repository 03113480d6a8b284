"""Benchmark the identifier-row training of the text encoder: own (N, D) parameter vs the whole table.

"table" is what far did before `far.concepts.TokenRows`: the whole (49,410, D) embedding through AdamW with
every other row's gradient zeroed by a hook; "rows" is `TokenRows`. Each step is the tiny text encoder's
forward on a batch of prompts, backward and AdamW; the modes are interleaved in blocks, figures are medians.

    python bench/token_rows.py --threads 1            # writes reports/bench/token_rows.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_stepper(mode: str, batch_size: int):
    import torch

    from far.concepts import TokenRows
    from far.config import ModelConfig
    from far.models import build_tiny_pipeline

    cfg = ModelConfig()
    text = build_tiny_pipeline(cfg.tiny, cfg.resolution, cfg.seed).text_encoder
    text.resize_token_embeddings(49410, mean_resizing=False)  # two identifier tokens, as add_concept_tokens does
    text.requires_grad_(False)
    rows = [49408, 49409]
    if mode == "table":
        param = text.get_input_embeddings().weight
        param.requires_grad_(True)
        mask = torch.zeros(param.shape[0], 1)
        mask[rows] = 1.0
        param.register_hook(lambda grad: grad * mask)
    else:
        param = TokenRows.install(text, rows).rows
    opt = torch.optim.AdamW([param], lr=1e-4, weight_decay=0.0)
    ids = torch.full((batch_size, 77), 49407)
    ids[:, :6] = torch.tensor([49406, 320, 49408, 537, 49409, 1929])
    text.train()

    def step() -> None:
        text(ids)[0].pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(
    out: Path = typer.Option(ROOT / "reports/bench/token_rows.json", help="JSON report to write."),
    batch_size: int = typer.Option(2),
    steps: int = typer.Option(60, help="timed steps per mode (after 3 warm-up steps each)."),
    block: int = typer.Option(5, help="steps per mode before switching (interleaving)."),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)."),
) -> None:
    """Time both modes; write the median s/step of each and the time saved per step."""
    import torch

    from far.io import write_json

    if threads:
        torch.set_num_threads(threads)
    steppers = {m: make_stepper(m, batch_size) for m in ("table", "rows")}
    for s in steppers.values():
        for _ in range(3):
            s()
    times: dict[str, list[float]] = {m: [] for m in steppers}
    while len(times["rows"]) < steps:
        for mode, s in steppers.items():
            for _ in range(block):
                t0 = time.perf_counter()
                s()
                times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    report = {"model": "embedded tiny text encoder (49,410 x 64 embedding)", "batch_size": batch_size,
              "torch_threads": torch.get_num_threads(), "timed_steps_per_mode": len(times["rows"]),
              "step_s": {m: round(v, 5) for m, v in med.items()},
              "saved_ms_per_step": round(1000 * (med["table"] - med["rows"]), 2)}
    write_json(out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    typer.run(main)
