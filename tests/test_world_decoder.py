"""far/world/decoder.py: the decoder learns, the encoder (the latent space) does not move, and a run
stopped at a checkpoint resumes to the weights an uninterrupted run reaches."""

from __future__ import annotations

import pytest
import torch

from far.world import decoder
from far.world.decoder import DecoderTuneConfig, tune_decoder
from far.world.model import WorldModelConfig, build_vae

TINY_MODEL = WorldModelConfig(resolution=32, vae_channels=(16, 16))
TINY = DecoderTuneConfig(scenes=24, steps=4, batch_size=4, resolution=32, checkpoint_every=2, log_every=100)


def _tuned(cfg: DecoderTuneConfig, work) -> dict[str, torch.Tensor]:  # noqa: ANN001 - a Path
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tune_decoder(cfg, build_vae(TINY_MODEL, 0), work).state_dict()
    finally:
        torch.set_num_threads(threads)


class Killed(Exception):
    pass


def test_only_the_decoder_learns_and_a_stopped_run_resumes_exactly(tmp_path, monkeypatch):
    initial = build_vae(TINY_MODEL, 0).state_dict()
    full = _tuned(TINY, tmp_path / "full")
    changed = {k for k in initial if not torch.equal(initial[k], full[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert any(k.startswith("decoder.") for k in changed)

    save = decoder._save_state

    def save_then_die(path, state):  # noqa: ANN001 - as if the run were killed right after its first checkpoint
        save(path, state)
        raise Killed

    monkeypatch.setattr(decoder, "_save_state", save_then_die)
    with pytest.raises(Killed):
        _tuned(TINY, tmp_path / "stopped")
    monkeypatch.setattr(decoder, "_save_state", save)
    assert torch.load(tmp_path / "stopped" / "decoder.ckpt", weights_only=True)["step"] == 2
    resumed = _tuned(TINY, tmp_path / "stopped")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
