"""far/attention.py: the concept-attention processor on the real tiny UNet."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from far.attention import (
    AttentionCollector,
    ConceptAttnProcessor,
    cross_attention_layers,
    install_concept_processors,
    select_layers,
    selection_matrix,
)
from far.errors import InvalidInputError
from far.losses import refine_losses
from far.models import load_base_pipeline
from tests.train_fixtures import base_model, one_thread


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    with one_thread():
        yield load_base_pipeline(base_model(tmp_path_factory.mktemp("attn"))).unet


def _inputs(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 16, 16, generator=g), torch.tensor([100, 700])[:b], torch.randn(b, 77, 64, generator=g)


def test_layers_by_resolution(unet):
    layers = cross_attention_layers(unet)
    assert len(layers) == 10 and all(".attn2." in n for n in layers)  # 3 down + 1 mid + 6 up
    chosen = select_layers(unet, [16], 8)  # 16 px per cell = latent / 2
    assert set(chosen.values()) == {2}
    assert {n.split(".")[0] + n.split(".")[1] for n in chosen} == {"down_blocks1", "up_blocks2"}
    assert set(select_layers(unet, [16], 8, "up")) < set(chosen)
    assert set(select_layers(unet, [8, 32], 8).values()) == {1, 4}
    assert list(select_layers(unet, [64], 8).values()) == [8]  # the mid block
    with pytest.raises(InvalidInputError, match=r"train.refine.downscale \[128\].*\[8, 16, 32, 64\]"):
        select_layers(unet, [128], 8)
    # behind a VAE that downsamples 4x, the same layers have one cell per half as many image pixels
    assert select_layers(unet, [8], 4) == chosen
    with pytest.raises(InvalidInputError, match=r"\[4, 8, 16, 32\]"):
        select_layers(unet, [64], 4)


def test_outputs_unchanged_and_maps_equal_explicit_softmax(unet):
    x, t, ctx = _inputs()
    ref = unet(x, t, ctx).sample
    layers = select_layers(unet, [16, 32], 8)
    col = AttentionCollector()
    install_concept_processors(unet, col, layers)
    try:
        procs = unet.attn_processors
        assert sum(isinstance(p, ConceptAttnProcessor) for p in procs.values()) == len(layers) == 6
        ids = torch.tensor([[49406, 320, 11, 12, 537, 13, 49407] + [49407] * 70] * 2)
        sel, valid = selection_matrix(ids, [[11, 12], [13]])
        assert valid.all() and torch.allclose(sel.sum(1), torch.ones(2, 2))
        col.start(sel, (16, 16))
        out = unet(x, t, ctx).sample
        col.stop()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)  # SDPA still computes the layer output
        assert set(col.maps) == set(layers)  # nothing stored for other layers
        # reference: the full probability matrix from diffusers' explicit processor, captured by a hook
        name = next(n for n, f in layers.items() if f == 2)
        attn = unet.get_submodule(name.removesuffix(".processor"))
        captured = {}
        full = AttnProcessor()
        orig = attn.get_attention_scores

        def grab(q, k, mask=None):
            probs = orig(q, k, mask)
            captured["p"] = probs
            return probs

        attn.get_attention_scores = grab
        attn.set_processor(full)
        unet(x, t, ctx)
        del attn.get_attention_scores
        probs = captured["p"].view(2, attn.heads, 64, 77).mean(1)  # (B, HW, T)
        expected = torch.stack([probs[..., [2, 3]].mean(-1), probs[..., 5]], dim=-1)  # (B, HW, K)
        torch.testing.assert_close(col.maps[name], expected, atol=1e-5, rtol=1e-4)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())


def test_refine_gradient_is_the_same_with_gradient_checkpointing(unet):
    x, t, ctx = _inputs(1)
    layers = select_layers(unet, [16], 8)
    ids = torch.tensor([[49406, 11, 12, 13] + [49407] * 73] * 2)
    sel, valid = selection_matrix(ids, [[11], [12, 13]])
    masks = {n: (torch.rand(2, 2, 64, generator=torch.Generator().manual_seed(2)) > 0.5).float() for n in layers}
    to_k = dict(unet.named_parameters())[next(iter(layers)).replace("processor", "to_k.weight")]
    grads = []
    for ckpt in (False, True):
        col = AttentionCollector()
        install_concept_processors(unet, col, layers)
        unet.train()
        if ckpt:
            unet.enable_gradient_checkpointing()
        to_k.requires_grad_(True)
        to_k.grad = None
        col.start(sel, (16, 16))
        unet(x, t, ctx)
        refine, _ = refine_losses(col.maps, masks, valid)
        refine.backward()
        col.stop()
        grads.append(to_k.grad.clone())
        unet.disable_gradient_checkpointing()
        unet.set_attn_processor(AttnProcessor2_0())
    to_k.requires_grad_(False)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_selection_respects_presence():
    ids = torch.tensor([[1, 5, 6, 2, 5, 6], [1, 5, 6, 7, 2, 2]])
    sel, valid = selection_matrix(ids, [[5, 6], [7]], present=torch.tensor([[True, True], [False, True]]))
    assert valid.tolist() == [[True, False], [False, True]]  # row 0 lacks token 7; row 1's concept 0 not in image
    assert torch.allclose(sel[0, [1, 2, 4, 5], 0], torch.full((4,), 0.25))


def test_maps_under_bf16_autocast_equal_fp32_maps():
    """The capture runs in fp32 even inside a bf16 autocast region (as accelerate's mixed precision sets)."""
    g = torch.Generator().manual_seed(0)
    # q, k as bf16 linears would give them (exactly representable), at a scale where bf16 logits lose digits
    q = (torch.randn(2, 4, 64, 16, generator=g) * 3).bfloat16()
    k = (torch.randn(2, 4, 77, 16, generator=g) * 3).bfloat16()
    ids = torch.tensor([[49406, 11, 12, 13] + [49407] * 73] * 2)
    sel, _ = selection_matrix(ids, [[11], [12, 13]])
    attn = type("Attn", (), {"scale": 16**-0.5})()
    maps = {}
    for autocast in (False, True):
        col = AttentionCollector()
        col.start(sel, (8, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ConceptAttnProcessor(col, "l", 1)._collect(attn, q, k, None, 64)
        maps[autocast] = col.maps["l"]
    assert maps[True].dtype == torch.float32
    reference = torch.softmax(q.float() @ k.float().transpose(-1, -2) * attn.scale, -1).mean(1)  # (B, HW, T)
    expected = torch.stack([reference[..., 1], reference[..., 2:4].mean(-1)], -1)
    torch.testing.assert_close(maps[False], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[True], maps[False], atol=1e-7, rtol=1e-6)
