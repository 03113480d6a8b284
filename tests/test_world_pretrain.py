"""far/world/pretrain.py: a short pretraining is reproducible, and a run killed (SIGKILL) resumes exactly.

The config is tiny (64 scenes at 32 px, 4 VAE steps, 6 UNet steps, one thread) so the whole file takes
seconds of CPU; what it checks does not depend on the size.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from far.io import file_sha256
from far.world.model import WorldModelConfig, build_unet
from far.world.pretrain import PretrainConfig, pretrain
from tests.conftest import ROOT, project_env

TINY = PretrainConfig(
    model=WorldModelConfig(resolution=32, vae_channels=(16, 16), unet_channels=(16, 32), unet_attention=(False, True),
                           text_hidden_size=32, text_layers=1),
    pool_size=64, vae_steps=4, vae_batch=4, steps=6, batch_size=4, warmup=2,
    checkpoint_every=3, snapshot_every=3, log_every=100,
)

# Runs TINY in a work folder and SIGKILLs itself right after the checkpoint file named argv[2] is written:
# no exception handler, atomic-write cleanup or final save runs, as when a long run is killed.
KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
import far.world.pretrain as pt
from far.world.model import WorldModelConfig
raw = json.loads(sys.argv[3])
cfg = pt.PretrainConfig(**raw | {"model": WorldModelConfig.from_dict(raw["model"]),
                                 "subject_counts": tuple(raw["subject_counts"])})
save = pt._save_state
def save_then_die(path, state):
    save(path, state)
    if path.name == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)
pt._save_state = save_then_die
pt.pretrain(cfg, Path(sys.argv[1]), threads=1)
"""


def _digests(model_dir: Path) -> dict[str, str]:
    return {p.relative_to(model_dir).as_posix(): file_sha256(p) for p in sorted(model_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    """One uninterrupted run of TINY; returns its final model directory."""
    threads = torch.get_num_threads()
    try:
        yield pretrain(TINY, tmp_path_factory.mktemp("run-a"), threads=1)
    finally:
        torch.set_num_threads(threads)


def test_two_runs_with_one_seed_give_identical_weights(uninterrupted_run, tmp_path):
    threads = torch.get_num_threads()
    try:
        again = pretrain(TINY, tmp_path, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert uninterrupted_run.name == again.name == "step-6"
    digests = _digests(uninterrupted_run)
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "model_index.json"} <= set(digests)
    assert digests == _digests(again)
    # ... and training moved the weights: the UNet is not its initialisation.
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(uninterrupted_run / "unet").state_dict()
    initial = build_unet(TINY.model, TINY.seed + 2).state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


def _killed_run(work: Path, checkpoint: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(work), checkpoint, json.dumps(TINY.to_dict())],
        cwd=ROOT, env=project_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_a_run_killed_after_each_checkpoint_resumes_to_the_same_weights(uninterrupted_run, tmp_path):
    _killed_run(tmp_path, "vae.ckpt")  # the first checkpoint: VAE step 3 of 4
    assert torch.load(tmp_path / "vae.ckpt", weights_only=True)["step"] == 3
    assert not (tmp_path / "vae").exists() and not (tmp_path / "unet.ckpt").exists()
    _killed_run(tmp_path, "unet.ckpt")  # resumes the VAE, then dies at UNet step 3 of 6
    assert torch.load(tmp_path / "unet.ckpt", weights_only=True)["step"] == 3
    assert not (tmp_path / "snapshots" / "step-6").exists()
    threads = torch.get_num_threads()
    try:
        resumed = pretrain(TINY, tmp_path, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert _digests(resumed) == _digests(uninterrupted_run)


def test_a_work_folder_refuses_another_config(uninterrupted_run):
    with pytest.raises(ValueError, match="holds a run with another config"):
        pretrain(PretrainConfig(**TINY.__dict__ | {"steps": 7}), uninterrupted_run.parents[1], threads=1)
