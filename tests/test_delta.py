"""far/delta.py: the saved delta, `far.load`, and the standard diffusers exports giving the same UNet outputs."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import far
from far.config import ModelConfig, TinyModelConfig
from far.delta import CUSTOM_DIFFUSION_FILE, DELTA_FILE, EMBEDDING_KEY, META_FILE
from far.errors import InvalidInputError
from far.models import load_base_pipeline, prepare_base_model
from far.train import train
from tests.train_fixtures import base_model, composites, concepts, one_thread, train_config

PROMPT = "a photo of <far-dog> dog and <far-dog3> dog"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta")
    with one_thread():
        yield root, base_model(root), composites(root, count=4, priors=0)


def _trained(setup, preset):
    root, base, data = setup
    out = root / preset
    if not (out / "far").exists():
        cfg = train_config(steps=2, learning_rate=1e-2, modules=preset, checkpoint_every=100, prior_ratio=0.0)
        with one_thread():
            train(cfg, concepts(), base, data, out / "far", out / "ckpt", None, log=lambda s: None)
    return out / "far"


def _unet_out(pipe):
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
        return ids, pipe.unet(torch.randn(1, 4, 16, 16, generator=g), torch.tensor([400]), ctx).sample


@pytest.mark.parametrize("preset", ["crossattn_kv", "crossattn", "lora", "unet"])
def test_far_load_and_plain_diffusers_export_agree(setup, preset):
    _, base, _ = setup
    delta = _trained(setup, preset)
    meta = json.loads((delta / META_FILE).read_text())
    tensors = load_file(str(delta / DELTA_FILE))
    assert not [p for p in delta.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".ckpt"}]  # no pickle
    assert tensors[EMBEDDING_KEY].shape == (2, 64) and [r["token"] for r in meta["token_rows"]] == [
        "<far-dog>", "<far-dog3>"]
    unet_keys = [k for k in tensors if k.startswith("unet.")]
    if preset == "crossattn_kv":
        assert unet_keys and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in unet_keys)
    if preset == "lora":
        assert unet_keys and all("lora_" in k for k in unet_keys)
    assert sum(t.numel() for t in tensors.values()) == meta["counts"]["total"]

    with one_thread():
        loaded = load_base_pipeline(base)
        far.load(loaded, delta)
        plain = load_base_pipeline(base)  # only documented diffusers calls below
        for ti in meta["export"]["textual_inversion"]:
            plain.load_textual_inversion(str(delta / "diffusers" / ti["file"]), token=ti["token"])
        fmt = meta["export"]["unet"]["format"]
        if fmt == "custom_diffusion":
            plain.unet.load_attn_procs(str(delta / "diffusers"), weight_name=CUSTOM_DIFFUSION_FILE, _pipeline=plain)
        elif fmt == "lora":
            plain.load_lora_weights(str(delta / "diffusers"))
        else:
            plain.unet = UNet2DConditionModel.from_pretrained(delta / "diffusers" / "unet")
        ids_a, out_a = _unet_out(loaded)
        ids_b, out_b = _unet_out(plain)
        _, out_base = _unet_out(load_base_pipeline(base))
    assert torch.equal(ids_a, ids_b) and {49408, 49409} <= set(ids_a[0].tolist())
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-4)
    assert (out_a - out_base).abs().max() > 1e-3  # the delta does change the model


def test_model_card_and_record(setup):
    delta = _trained(setup, "crossattn_kv")
    meta = json.loads((delta / META_FILE).read_text())
    assert meta["base"]["pretrained"] == "tiny" and len(meta["data"]["sha256"]) == 64
    assert [c["name"] for c in meta["concepts"]] == ["dog", "dog3"] and meta["params"]["modules"] == "crossattn_kv"
    card = (delta / "README.md").read_text()
    assert meta["data"]["sha256"] in card and "<far-dog3>" in card and "far.load(pipe" in card


def test_load_into_a_different_base_model_fails_clearly(setup, tmp_path):
    delta = _trained(setup, "crossattn_kv")
    other = tmp_path / "other"
    prepare_base_model(ModelConfig(resolution=128, tiny=TinyModelConfig(unet_channels=[32, 32, 64, 64])), other)
    with pytest.raises(InvalidInputError, match=r"unet\..*attn2\.to_[kv]\.weight .* does not match this pipeline"):
        far.load(load_base_pipeline(other), delta)
    with pytest.raises(InvalidInputError, match="not a far delta"):
        far.load(load_base_pipeline(other), tmp_path)
