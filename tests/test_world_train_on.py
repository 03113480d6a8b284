"""Training the oracle and the world CLIP on from earlier weights (--init), and resuming a killed CLIP run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

import far.world.clip as world_clip
from far.world.clip import ClipTrainConfig, build_clip, save_clip, train_clip
from far.world.oracle import Oracle, PixelNet, SubjectNet
from far.world.oracle_train import OracleTrainConfig, train_oracle

SMALL_CLIP = ClipTrainConfig(scenes=24, steps=4, batch_size=6, width=64, layers=1, vision_width=64, vision_layers=1,
                             embed_dim=16, patch=16, exchange_images=True, exchange_weight=0.5)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    """A one-level VAE: round trips are all the trainers need of it."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_clip_run_resumes_to_the_weights_of_an_unbroken_one(vae, tmp_path, monkeypatch):
    unbroken = train_clip(SMALL_CLIP, vae, checkpoint=tmp_path / "a.ckpt", checkpoint_every=2).state_dict()
    loss, calls = world_clip.contrastive_loss, []

    def killed_at_step_3(*args, **kwargs):  # noqa: ANN202 - the kill arrives while step 3 runs
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    monkeypatch.setattr(world_clip, "contrastive_loss", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_clip(SMALL_CLIP, vae, checkpoint=tmp_path / "b.ckpt", checkpoint_every=2)
    assert torch.load(tmp_path / "b.ckpt", weights_only=True)["step"] == 2
    monkeypatch.setattr(world_clip, "contrastive_loss", loss)
    resumed = train_clip(SMALL_CLIP, vae, checkpoint=tmp_path / "b.ckpt", checkpoint_every=2).state_dict()
    assert _same(resumed, unbroken)
    # The checkpoint of one run is never taken for another's.
    with pytest.raises(ValueError, match=r"b\.ckpt: a checkpoint of another CLIP run"):
        train_clip(ClipTrainConfig(**(SMALL_CLIP.__dict__ | {"steps": 6})), vae, checkpoint=tmp_path / "b.ckpt")


def test_clip_training_goes_on_from_its_init(vae, tmp_path):
    start = build_clip(ClipTrainConfig(**(SMALL_CLIP.__dict__ | {"seed": 7})))
    save_clip(start, tmp_path / "start.pt")
    frozen = ClipTrainConfig(**(SMALL_CLIP.__dict__ | {"lr": 0.0}))  # no step moves a weight
    trained = train_clip(frozen, vae, init=tmp_path / "start.pt").state_dict()
    assert _same(trained, {k: v.half().float() for k, v in start.state_dict().items()})
    assert not _same(trained, build_clip(frozen).state_dict())  # not the scratch weights
    other = build_clip(ClipTrainConfig(**(SMALL_CLIP.__dict__ | {"embed_dim": 32})))
    save_clip(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a world CLIP of this config's sizes"):
        train_clip(SMALL_CLIP, vae, init=tmp_path / "other.pt")


def _oracle(width: int, subject_width: int, seed: int) -> Oracle:
    torch.manual_seed(seed)
    return Oracle(PixelNet(width), SubjectNet(subject_width), 64)


def test_oracle_training_goes_on_from_its_init(vae, tmp_path: Path):
    cfg = OracleTrainConfig(scenes=12, steps=2, batch_size=4, width=8, subject_width=8, lr=0.0)
    init = _oracle(8, 8, seed=5)
    expected = {k: v.clone() for k, v in init.subject.state_dict().items()}
    trained = train_oracle(cfg, vae, init=init)
    assert _same(trained.subject.state_dict(), expected)
    scratch = train_oracle(cfg, vae)
    assert not _same(scratch.subject.state_dict(), expected)
    with pytest.raises(ValueError, match=r"its \{'width': 8, 'subject_width': 16, 'resolution': 64\} differ"):
        train_oracle(cfg, vae, init=_oracle(8, 16, seed=5))
