"""far/models.py: the embedded tiny model and the resolution of real ones."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from far.config import ModelConfig, TinyModelConfig
from far.errors import InvalidInputError
from far.models import (
    SOURCE_FILE,
    BaseModelError,
    build_tiny_pipeline,
    check_resolution,
    prepare_base_model,
    resolution_multiple,
    vae_factor,
)


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "base"
    prepare_base_model(ModelConfig(), out)
    return out


def test_tiny_model_is_byte_identical_when_rebuilt(tiny_dir: Path, tmp_path: Path):
    again = tmp_path / "base"
    prepare_base_model(ModelConfig(), again)
    assert _digests(again) == _digests(tiny_dir)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer_config.json"} <= set(
        _digests(tiny_dir)
    )


def test_another_seed_gives_other_weights(tiny_dir: Path, tmp_path: Path):
    other = tmp_path / "base"
    prepare_base_model(ModelConfig(seed=1), other)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert _digests(other)[name] != _digests(tiny_dir)[name]


def test_from_pretrained_generates_offline(tiny_dir: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert any(type(m).__name__ == "Attention" and m.is_cross_attention for m in pipe.unet.modules())
    image = pipe(
        "a photo of a dog", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]
    assert image.shape == (256, 256, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0


def test_vae_factor_and_resolution_come_from_the_model():
    """A tiny model whose VAE has 3 levels downsamples 4x: latents, the UNet's size and the checks follow."""
    pipe = build_tiny_pipeline(TinyModelConfig(vae_channels=[16, 32, 64]), resolution=64, seed=0)
    assert vae_factor(pipe.vae) == pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    assert pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape[-1] == 16
    assert resolution_multiple(pipe) == 32  # 4x VAE, UNet halving the latent 3 times
    check_resolution(pipe, 96, "here")
    with pytest.raises(InvalidInputError, match=r"model.resolution: 80 is invalid for the base model in here: "
                                                r"must be a multiple of 32 \(its VAE downsamples 4x"):
        check_resolution(pipe, 80, "here")


def test_local_directory_is_resolved_and_recorded(tiny_dir: Path, tmp_path: Path):
    out = tmp_path / "base"
    record = prepare_base_model(ModelConfig(pretrained=str(tiny_dir)), out)
    assert record["source"] == "local" and record["path"] == str(tiny_dir.resolve())
    assert json.loads((out / SOURCE_FILE).read_text())["pretrained"] == str(tiny_dir)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert _digests(out)[name] == _digests(tiny_dir)[name]


def test_incomplete_local_directory_fails_naming_it(tiny_dir: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    out = tmp_path / "base"
    with pytest.raises(BaseModelError, match=r"broken.*missing pipeline components \['vae'\]"):
        prepare_base_model(ModelConfig(pretrained=str(broken)), out)
    assert not out.exists()


def test_hub_id_offline_fails_without_the_network_and_is_never_replaced_by_tiny(tmp_path: Path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the offline Hub lookup opened a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(socket.socket, "connect", no_network)  # no retries or timeouts to wait for: it must not try
    with pytest.raises(BaseModelError, match="stabilityai/stable-diffusion-2-1-base.*could not be found"):
        prepare_base_model(ModelConfig(pretrained="stabilityai/stable-diffusion-2-1-base"), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_nonsense_value_is_named(tmp_path: Path):
    with pytest.raises(BaseModelError, match="'not a model' is neither 'tiny'"):
        prepare_base_model(ModelConfig(pretrained="not a model"), tmp_path / "base")
