"""Resumable training checkpoints in `models/checkpoints/step-NNNNNN/` (a persisted DVC output).

Each holds everything that decides the rest of the run, so a resumed run ends bit-identical (on CPU) to
an uninterrupted one: the trained tensors (`trainable.safetensors`), optimizer and LR-scheduler state
(`optimizer.pt`, read back with `weights_only=True`), the noise generator and global torch RNG
(`rng.pt`), the step and the stream position (`state.json`), and a copy of the dvclive logs so the curves
stay whole. The embedding's Adam moments are those of the trained rows only (`packed_rows`: their token ids).
A checkpoint is used only if its `fingerprint` (params, concepts, base model, data, process count)
matches the run; stale ones are deleted. Written atomically; the newest `keep` are kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from far.io import atomic_dir, write_json

PREFIX = "step-"


@dataclass
class Resumed:
    step: int
    position: int
    path: Path
    tensors: dict[str, torch.Tensor]  # the trained tensors, as given to save_checkpoint


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).glob(f"{PREFIX}*") if p.is_dir() and (p / "state.json").is_file())


def _pack_optimizer(state: dict[str, Any], emb_index: int | None, rows: list[int]) -> dict[str, Any]:
    """Mark the embedding group's state as the trained rows' (it is: far.concepts.TokenRows is (N, D))."""
    if emb_index is None or emb_index not in state["state"]:
        return state
    return {**state, "packed_rows": rows}


def _unpack_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state as `load_state_dict` takes it (the row moments already fit the (N, D) parameter)."""
    return {k: v for k, v in state.items() if k != "packed_rows"}


def save_checkpoint(
    root: Path,
    step: int,
    position: int,
    fingerprint: str,
    tensors: dict[str, torch.Tensor],
    optimizer,
    lr_scheduler,
    generator: torch.Generator,
    emb_index: int | None,
    emb_rows: list[int],
    live_dir: Path | None,
    keep: int,
) -> Path:
    final = Path(root) / f"{PREFIX}{step:06d}"
    with atomic_dir(final) as tmp:
        flat = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        save_file(flat, str(tmp / "trainable.safetensors"))
        opt = _pack_optimizer(optimizer.state_dict(), emb_index, emb_rows)
        torch.save({"optimizer": opt, "scheduler": lr_scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, "position": position, "fingerprint": fingerprint})
        if live_dir is not None and Path(live_dir).is_dir():
            shutil.copytree(live_dir, tmp / "dvclive")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_resumable(root: Path, fingerprint: str) -> Path | None:
    """Newest checkpoint of this exact run; checkpoints of any other configuration are deleted."""
    found = None
    for ckpt in list_checkpoints(root):
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("fingerprint") == fingerprint:
            found = ckpt
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
    return found


def load_checkpoint(
    ckpt: Path,
    optimizer,
    lr_scheduler,
    generator: torch.Generator,
    live_dir: Path | None,
) -> Resumed:
    """Restore optimizer, scheduler, RNGs and dvclive logs; the trained tensors are returned, not applied."""
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    blob = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(_unpack_optimizer(blob["optimizer"]))
    lr_scheduler.load_state_dict(blob["scheduler"])
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if live_dir is not None and (ckpt / "dvclive").is_dir():
        shutil.rmtree(live_dir, ignore_errors=True)
        shutil.copytree(ckpt / "dvclive", live_dir)
    state = json.loads((ckpt / "state.json").read_text())
    return Resumed(step=state["step"], position=state["position"], path=ckpt, tensors=tensors)
