"""Shared builders for the train-stage tests: a small tiny base model and side-by-side composites.

The composites stand in for the fuse stage's output (far.trainset.simple_composites over the shipped
photos, rectangle masks), written with the real far.dataset.write_training_set.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from far.config import ConceptsConfig, ModelConfig, TinyModelConfig, TrainConfig
from far.dataset import write_training_set
from far.models import prepare_base_model
from far.trainset import simple_composites
from tests.conftest import ROOT

RESOLUTION = 128  # 16x16 latents: fast on 2 shared cores; refine maps at downscale 16 are 8x8


def concepts() -> ConceptsConfig:
    data = yaml.safe_load((ROOT / "configs" / "dreambench-tiny.yaml").read_text())["concepts"]
    for c in data["subjects"]:
        c["images"] = str(ROOT / c["images"])
    return ConceptsConfig.model_validate(data)


def base_model(root: Path, resolution: int = RESOLUTION, **tiny) -> Path:
    """The tiny base model at `resolution`; `tiny` overrides its sizes (e.g. vae_channels=[16, 32, 64]: 4x VAE)."""
    out = root / ("base" + str(resolution) + "".join(f"_{k}{v}" for k, v in sorted(tiny.items())))
    if not out.exists():
        prepare_base_model(ModelConfig(resolution=resolution, tiny=TinyModelConfig(**tiny)), out)
    return out


def composites(root: Path, count: int = 12, priors: int = 4, resolution: int = RESOLUTION, seed: int = 0) -> Path:
    out = root / f"train_{resolution}_{count}_{priors}_{seed}.parquet"
    if not out.exists():
        rows = simple_composites(concepts().subjects, resolution, count, seed=seed, priors=priors)
        write_training_set(rows, out, row_group_size=8)
    return out


def train_config(**update) -> TrainConfig:
    """Default train params, shrunk for tests; refine maps at 8x8 (downscale 16 at 128 px)."""
    cfg = TrainConfig(steps=4, batch_size=2, checkpoint_every=2, log_every=2)
    cfg.refine.downscale = [16]
    refine = update.pop("refine", {})
    for k, v in refine.items():
        setattr(cfg.refine, k, v)
    return cfg.model_copy(update=update)


class one_thread:
    """Run torch on one thread: with other jobs on 2 cores, 2 OpenMP threads are ~10x slower (measured)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
