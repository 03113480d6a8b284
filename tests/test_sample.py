"""far/sample.py: sampling with the real tiny diffusers pipeline, attention capture, determinism, resume."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from far.attention import AttentionCollector, install_concept_processors
from far.concepts import add_concept_tokens
from far.config import ConceptsConfig, ModelConfig, SampleConfig
from far.errors import InvalidInputError
from far.models import load_base_pipeline, prepare_base_model
from far.sample import (
    MANIFEST,
    Job,
    StepMaps,
    _fingerprint,
    build_prompts,
    choose_layers,
    concept_token_ids,
    generate,
    run_sample,
)
from tests.conftest import ROOT

CONCEPTS = ConceptsConfig(subjects=[
    {"name": "dog", "token": "<far-dog>", "class_word": "dog", "images": ROOT / "data/concepts/dog"},
    {"name": "dog3", "token": "<far-dog3>", "class_word": "dog", "images": ROOT / "data/concepts/dog3"},
])
# 1 DreamBench prompt per dog + 1 two-dog prompt, one seed: 3 images, a few denoising steps
SMALL = {"seeds": [0], "num_inference_steps": 2, "prompts_per_concept": 1, "multi_prompts": 1, "batch_size": 2}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model at 128 px (latent 16: cross-attention at 16, 8, 4 and 2 px) to keep sampling fast."""
    path = tmp_path_factory.mktemp("base") / "base"
    prepare_base_model(ModelConfig(resolution=128), path)
    return path


def pipe_with_tokens(base: Path):
    """The base pipeline with the concept tokens added as far.load does (minus the trained weights)."""
    pipe = load_base_pipeline(base)
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, CONCEPTS.subjects)
    return pipe


def sample(base: Path, out: Path, **overrides) -> dict:
    return run_sample(base, None, out, SampleConfig(**{**SMALL, **overrides}), CONCEPTS, pipe=pipe_with_tokens(base))


@pytest.fixture(scope="module")
def fresh(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One complete run with SMALL: the reference other runs are compared with."""
    out = tmp_path_factory.mktemp("fresh") / "samples"
    return out, sample(base, out)


def test_step_maps_average_the_softmax_of_the_conditioned_half_over_layers_and_steps(base: Path):
    """StepMaps + far.attention give, per concept, mean over heads/layers/steps of softmax(qk^T) columns."""
    pipe = pipe_with_tokens(base)
    unet = pipe.unet
    layers = choose_layers(unet, [32, 64], pipe.vae_scale_factor)  # 4x4 and 2x2 maps at 128 px
    assert sorted(set(layers.values())) == [4, 8]
    expected: dict[str, list[torch.Tensor]] = {}

    def manual(name: str):  # the reference: plain softmax over all 77 text tokens of the conditioned row
        def hook(module, args, kwargs, output):
            hidden, text = args[0], kwargs["encoder_hidden_states"]
            q = module.to_q(hidden[1]).view(hidden.shape[1], module.heads, -1).transpose(0, 1)  # (h, HW, d)
            k = module.to_k(text[1]).view(77, module.heads, -1).transpose(0, 1)  # (h, T, d)
            probs = torch.softmax(q @ k.transpose(1, 2) * module.scale, dim=-1).mean(0)  # (HW, T)
            expected.setdefault(name, []).append(probs)
        return hook

    handles = [unet.get_submodule(n.removesuffix(".processor")).register_forward_hook(manual(n), with_kwargs=True)
               for n in layers]
    collector = AttentionCollector()
    install_concept_processors(unet, collector, layers)
    maps = StepMaps(collector, layers, 16)
    selection = torch.zeros(1, 77, 2)
    selection[0, 5, 0] = 1.0
    selection[0, [6, 7], 1] = 0.5
    torch.manual_seed(0)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)  # (uncond, cond)
    maps.start(selection, guided=True)
    with torch.no_grad():
        for t in (800, 400):
            unet(torch.randn(2, 4, 16, 16), t, encoder_hidden_states=text)
            maps.step_end()
    for h in handles:
        h.remove()
    assert maps.steps == 2 and maps.side == 4
    ref = torch.zeros(2, 4, 4)
    for name, per_step in expected.items():
        side = 16 // layers[name]
        for probs in per_step:
            cols = torch.stack([probs[:, 5], probs[:, 6:8].mean(-1)]).reshape(1, 2, side, side)
            ref += F.interpolate(cols, size=(4, 4), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(maps.sum[0], ref, atol=1e-5, rtol=1e-4)
    result = maps.result()  # (1, 2, 4, 4)
    assert result.shape == (1, 2, 4, 4) and torch.allclose(result.amax(dim=(2, 3)), torch.ones(1, 2))


def test_concept_tokens_must_exist_after_the_delta(base: Path):
    pipe = load_base_pipeline(base)
    with pytest.raises(InvalidInputError, match=r"token '<far-dog>' \(dog\) is unknown to the model from here"):
        concept_token_ids(pipe.tokenizer, CONCEPTS, Path("here"))
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, CONCEPTS.subjects)
    ids = concept_token_ids(pipe.tokenizer, CONCEPTS, Path("here"))
    assert len(ids) == 2 and all(len(i) == 1 for i in ids) and ids[0] != ids[1]
    sks = ConceptsConfig(subjects=[{**CONCEPTS.subjects[0].model_dump(), "token": "sks"}])
    assert concept_token_ids(pipe.tokenizer, sks, Path("here")) == [pipe.tokenizer("sks", add_special_tokens=False)
                                                                      .input_ids]


def test_run_sample_writes_images_maps_and_manifest_deterministically(base: Path, fresh, tmp_path: Path):
    out, summary = fresh
    df = pd.read_parquet(out / MANIFEST)
    assert summary["images"] == len(df) == 3 and summary["generated"] == 3
    assert list(df["kind"]) == ["single", "single", "multi"]
    assert [list(c) for c in df["concepts"]] == [["dog"], ["dog3"], ["dog", "dog3"]]
    assert df["prompt"].iloc[2].startswith("a <far-dog> dog and a <far-dog3> dog ")
    for row in df.itertuples():
        assert (out / row.path).is_file() and row.path == f"{row.prompt_idx:03d}_{row.seed}.png"
        assert [Path(a).name for a in row.attention] == [f"{row.prompt_idx:03d}_0_{c}.npy" for c in row.concepts]
        for a in row.attention:
            m = np.load(out / a)
            assert m.dtype == np.float32 and m.shape == (4, 4) and float(m.max()) == 1.0 and float(m.min()) >= 0
    multi = [np.load(out / a) for a in df["attention"].iloc[2]]
    assert not np.array_equal(multi[0], multi[1])  # each concept token has its own map
    assert not (out.parent / ".samples.partial").exists()
    assert summary["scheduler"] == "DDIMScheduler" and summary["attention_side"] == 4

    sample(base, tmp_path / "b")
    for f in sorted(p.relative_to(out) for p in out.rglob("*") if p.suffix in {".png", ".npy", ".parquet"}):
        assert (out / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_a_killed_run_resumes_with_its_finished_images(base: Path, fresh, tmp_path: Path):
    fresh = fresh[0]
    cfg = SampleConfig(**SMALL)
    out = tmp_path / "samples"
    work = tmp_path / ".samples.partial"  # what a run killed after its first batch leaves behind
    work.mkdir()
    (work / ".key").write_text(_fingerprint(base, None, cfg, CONCEPTS, 128))  # the base model's native size
    specs = build_prompts([(c.name, c.token, c.class_word) for c in CONCEPTS.subjects], 1, 1, 2, ["dog", "cat"])
    generate(pipe_with_tokens(base), [Job(specs[0], 0), Job(specs[1], 0)], CONCEPTS, cfg, work)
    summary = run_sample(base, None, out, cfg, CONCEPTS, pipe=pipe_with_tokens(base))
    assert (summary["resumed"], summary["generated"]) == (2, 1)
    for f in ("000_0.png", "001_0.png", "002_0.png", "attn/002_0_dog3.npy", MANIFEST):
        assert (out / f).read_bytes() == (fresh / f).read_bytes(), f
    # a partial run made with other params is discarded, not mixed in
    work.mkdir()
    (work / ".key").write_text("other params")
    (work / "000_0.png").write_bytes(b"stale")
    singles = SampleConfig(**{**SMALL, "multi_prompts": 0})
    assert run_sample(base, None, out, singles, CONCEPTS, pipe=pipe_with_tokens(base))["resumed"] == 0
    assert (out / "000_0.png").read_bytes() == (fresh / "000_0.png").read_bytes()


def test_negative_prompt_and_guidance_reach_the_pipeline(base: Path, fresh, tmp_path: Path):
    plain = fresh[0]
    negative = tmp_path / "neg"
    sample(base, negative, multi_prompts=0, negative_prompt="blurry, low quality")
    unguided = tmp_path / "unguided"
    sample(base, unguided, multi_prompts=0, guidance_scale=1.0)
    a, b, c = ((d / "000_0.png").read_bytes() for d in (plain, negative, unguided))
    assert a != b and a != c
    assert float(np.load(unguided / "attn/000_0_dog.npy").max()) == 1.0


def test_scheduler_param_swaps_the_scheduler(base: Path, tmp_path: Path):
    summary = sample(base, tmp_path / "s", multi_prompts=0, scheduler="euler")
    assert summary["scheduler"] == "EulerDiscreteScheduler"


@pytest.mark.parametrize(("downscale", "message"), [
    ([24], r"sample.attention_downscale: \[24\] is invalid: this UNet has cross-attention layers at downscale "
           r"\[8, 16, 32, 64\]"),
    ([32, 128], r"sample.attention_downscale: \[128\] is invalid"),
])
def test_bad_attention_downscale_is_named_before_any_work(base: Path, tmp_path: Path, downscale, message):
    with pytest.raises(InvalidInputError, match=message):
        sample(base, tmp_path / "x", attention_downscale=downscale)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()


def test_missing_inputs_are_input_errors(base: Path, tmp_path: Path):
    with pytest.raises(InvalidInputError, match=r"token '<far-dog>' \(dog\) is unknown"):
        run_sample(base, None, tmp_path / "x", SampleConfig(**SMALL), CONCEPTS, pipe=load_base_pipeline(base))
    with pytest.raises(InvalidInputError, match="no base model"):
        run_sample(tmp_path / "nowhere", None, tmp_path / "x", SampleConfig(**SMALL), CONCEPTS)
    with pytest.raises(InvalidInputError, match="no trained delta"):
        run_sample(base, tmp_path / "nodelta", tmp_path / "x", SampleConfig(**SMALL), CONCEPTS)


@pytest.mark.slow
def test_sample_stage_applies_the_trained_delta(base: Path, tmp_path: Path, params_file):
    """The real chain: a 1-step train stage writes models/far; the sample stage loads it with far.load."""
    from tests import report_fixtures
    from tests.conftest import run

    def edit(p: dict) -> None:
        p["train"].update(steps=1, checkpoint_every=1, prior_ratio=0.0)  # the fixture's rows hold no prior
        p["model"]["resolution"] = 128  # the base model's and the fixture rows' size
        p["sample"].update(SMALL)

    params = params_file(edit)
    data = report_fixtures.fusion(tmp_path / "fusion") / "train.parquet"
    py = [sys.executable, "-m"]
    run([*py, "stages.train", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "far"),
         "--checkpoints", str(tmp_path / "ckpt"), "--live", str(tmp_path / "live"), "--params", str(params)], ROOT)
    proc = run([*py, "stages.sample", "--base", str(base), "--delta", str(tmp_path / "far"),
                "--out", str(tmp_path / "samples"), "--params", str(params)], ROOT)
    assert "sample: 3 images (3 prompts x 1 seeds, 0 resumed)" in proc.stdout
    df = pd.read_parquet(tmp_path / "samples" / MANIFEST)
    assert len(df) == 3 and all((tmp_path / "samples" / p).is_file() for p in df["path"])
    untrained = tmp_path / "untrained"
    sample(base, untrained)  # same tokens, untrained (class-mean) embeddings and base UNet
    assert (tmp_path / "samples/000_0.png").read_bytes() != (untrained / "000_0.png").read_bytes()

    bad = run([*py, "stages.sample", "--base", str(base), "--delta", str(tmp_path / "nowhere"),
               "--out", str(tmp_path / "s2"), "--params", str(params)], ROOT, check=False)
    assert bad.returncode == 2 and "no trained delta" in bad.stderr
