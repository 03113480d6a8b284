"""far/train.py + stages/train.py: the training loop, Localized Refinement's effect, checkpoints and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from far.config import SampleConfig
from far.delta import DELTA_FILE, EMBEDDING_KEY
from far.errors import InvalidInputError
from far.models import load_base_pipeline
from far.sample import run_sample
from far.train import TrainingDivergedError, measure_attention_in_mask, train, train_step
from far.train import setup as setup_run
from tests.conftest import ROOT, project_env
from tests.train_fixtures import RESOLUTION, base_model, composites, concepts, one_thread, train_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    with one_thread():
        yield root, base_model(root), composites(root)


def _run(cfg, setup, name, **kw):
    root, base, data = setup
    out = root / name
    with one_thread():
        summary = train(cfg, concepts(), base, kw.pop("data", data), out / "far", out / "ckpt", out / "live",
                        log=lambda s: None, **kw)
    return out, summary


def test_refine_raises_attention_inside_each_concepts_mask(setup):
    """Same composites, same steps and seed: only refine.weight differs. Measured on fixed noise/timesteps."""
    root, base, data = setup
    scores = {}
    for weight in (5.0, 0.0):
        cfg = train_config(steps=20, batch_size=4, learning_rate=1e-2, log_every=20, checkpoint_every=100,
                           refine={"weight": weight})
        out, _ = _run(cfg, setup, f"refine{weight}")
        with one_thread():
            scores[weight] = measure_attention_in_mask(load_base_pipeline(base), out / "far", data, concepts(), [16],
                                                       timesteps=(300, 700), max_rows=12)
    with one_thread():
        untrained = measure_attention_in_mask(load_base_pipeline(base), None, data, concepts(), [16],
                                              timesteps=(300, 700), max_rows=12)
    # each mask covers 1/4 of the image: uniform attention scores 0.25
    assert abs(untrained - 0.25) < 0.02 and abs(scores[0.0] - untrained) < 0.03, (untrained, scores)
    assert scores[5.0] > scores[0.0] + 0.05, scores


def test_resume_after_stop_gives_identical_weights_and_whole_logs(setup):
    cfg = train_config(steps=5, checkpoint_every=2, log_every=1)
    full, s_full = _run(cfg, setup, "full")
    assert s_full["done"] and (full / "far" / DELTA_FILE).is_file()
    part, s_part = _run(cfg, setup, "part", stop_after=3)  # checkpoint at 2; step 3 is lost, as if killed
    assert not s_part["done"] and not (part / "far").exists()
    assert sorted(p.name for p in (part / "ckpt").iterdir()) == ["step-000002"]
    _, s_res = _run(cfg, setup, "part")
    assert s_res["done"]
    assert (part / "far" / DELTA_FILE).read_bytes() == (full / "far" / DELTA_FILE).read_bytes()
    # dvclive: the resumed run's curves equal the uninterrupted run's (no duplicated or missing steps)
    for tsv in ("train/loss.tsv", "train/refine.tsv", "train/attn_in_mask.tsv", "train/lr.tsv"):
        a = [line.split("\t") for line in (full / "live/plots/metrics" / tsv).read_text().splitlines()]
        b = [line.split("\t") for line in (part / "live/plots/metrics" / tsv).read_text().splitlines()]
        assert a == b and len(a) >= 4, tsv  # attn_in_mask is skipped on an all-prior batch (no concept)
    assert len((part / "live/plots/metrics/train/loss.tsv").read_text().splitlines()) == 6  # header + steps 1..5
    metrics = json.loads((part / "live/metrics.json").read_text())
    assert metrics["step"] == 5 and set(metrics["train"]) >= {"loss", "diffusion", "prior", "refine", "lr"}
    assert sorted(p.name for p in (part / "ckpt").iterdir()) == ["step-000004", "step-000005"]  # keep_checkpoints
    # the checkpoint format is unchanged: the identifier rows and their Adam moments, (N, D), by token id
    assert load_file(str(part / "ckpt/step-000005/trainable.safetensors"))[EMBEDDING_KEY].shape == (2, 64)
    opt = torch.load(part / "ckpt/step-000005/optimizer.pt", weights_only=True)["optimizer"]
    assert opt["packed_rows"] == [49408, 49409]
    emb_state = opt["state"][max(opt["state"])]  # the embedding group comes last
    assert emb_state["exp_avg"].shape == emb_state["exp_avg_sq"].shape == (2, 64)


def test_accumulation_checkpointing_bf16_masked_loss_and_presets_run(setup):
    cfg = train_config(steps=2, gradient_accumulation=2, gradient_checkpointing=True, mixed_precision="bf16",
                       masked_loss=True, modules="lora", train_token_embeddings=False, log_every=1,
                       refine={"exclusivity_weight": 0.5, "normalize": "sum"})
    out, s = _run(cfg, setup, "options")
    assert s["done"] and s["token_embeddings"] == 0 and s["unet"] > 0
    metrics = json.loads((out / "live/metrics.json").read_text())["train"]
    assert all(v == v and abs(v) < 1e3 for v in metrics.values()), metrics  # finite
    assert metrics["exclusivity"] > 0


@pytest.mark.parametrize(("ratio", "batch", "expected"), [(1.0, 2, {"instance": 6, "prior": 6}),
                                                         (0.5, 3, {"instance": 12, "prior": 6}),
                                                         (0.0, 2, {"instance": 12, "prior": 0})])
def test_prior_ratio_holds_over_a_run(setup, ratio, batch, expected):
    """12 fusion + 4 prior rows: whatever the data's share, the run sees `prior_ratio` priors per instance row."""
    cfg = train_config(steps=6, batch_size=batch, prior_ratio=ratio, checkpoint_every=100, log_every=6,
                       refine={"weight": 0.0})
    _, s = _run(cfg, setup, f"ratio{ratio}")
    assert s["done"] and s["rows"] == expected


def test_the_unet_trains_in_training_mode(setup, tmp_path):
    root, base, data = setup
    with one_thread():
        run = setup_run(train_config(), concepts(), base, data, tmp_path / "ckpt", None, log=lambda s: None)
        modes = []
        run.unet.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        train_step(run)
    assert modes == [True] and run.text_encoder.training  # the token rows train: the text encoder too
    assert run.trainable.embedding.shape == (2, 64)  # only the identifier rows are a parameter
    assert not any(p.requires_grad for n, p in run.text_encoder.named_parameters() if "rows" not in n)


def test_the_token_rows_take_their_own_learning_rate(setup, tmp_path):
    root, base, data = setup
    with one_thread():
        run = setup_run(train_config(learning_rate=1e-4, token_learning_rate=3e-3), concepts(), base, data,
                        tmp_path / "ckpt", None, log=lambda s: None)
        before = run.trainable.embedding.detach().clone()
        train_step(run)
    groups = run.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-4, 3e-3] and groups[1]["params"] == [run.trainable.embedding]
    # Adam's first step moves every coordinate by about the rate
    step = (run.trainable.embedding.detach() - before).abs()
    assert torch.allclose(step.median(), torch.tensor(3e-3), rtol=0.2), step.median()
    same = setup_run(train_config(learning_rate=1e-4), concepts(), base, data, tmp_path / "ckpt2", None,
                     log=lambda s: None)
    assert [g["lr"] for g in same.optimizer.param_groups] == [1e-4, 1e-4]


def test_a_4x_vae_model_trains_and_samples_at_model_resolution(setup, tmp_path):
    """Tiny model whose VAE has 3 levels (4x): latents, masks, refine layers and sampling follow its config."""
    root = setup[0]
    with one_thread():
        base = base_model(root, 64, vae_channels=[16, 32, 64])
        data = composites(root, count=6, priors=2, resolution=64)
    cfg = train_config(steps=2, learning_rate=1e-2, log_every=1, refine={"downscale": [8]})  # 8 px/cell: 8x8 maps
    out, s = _run(cfg, (root, base, data), "vae4x", resolution=64)
    assert s["done"] and s["rows"] == {"instance": 2, "prior": 2}
    meta = json.loads((out / "far" / "far_delta.json").read_text())
    assert meta["resolution"] == 64 and set(meta["refine_layers"].values()) == {2}
    metrics = json.loads((out / "live/metrics.json").read_text())["train"]
    assert 0 < metrics["attn_in_mask"] < 1 and metrics["refine"] > 0
    scfg = SampleConfig(seeds=[0], num_inference_steps=2, prompts_per_concept=1, multi_prompts=1, batch_size=2,
                        attention_downscale=[8])
    with one_thread():
        summary = run_sample(base, out / "far", tmp_path / "samples", scfg, concepts(), resolution=96)
    assert summary["resolution"] == 96 and summary["attention_side"] == 12
    with Image.open(next((tmp_path / "samples").glob("*.png"))) as im:
        assert im.size == (96, 96)
    assert np.load(next((tmp_path / "samples/attn").glob("*.npy"))).shape == (12, 12)
    # a resolution the model cannot run at, or rows made at another size, fail naming model.resolution
    with pytest.raises(InvalidInputError, match=r"model.resolution: 80 is invalid for the base model in .*"
                                                r"multiple of 32 \(its VAE downsamples 4x"):
        _run(cfg, (root, base, data), "vae4x_bad", resolution=80)
    with pytest.raises(InvalidInputError, match=r"is 64x64 px, but model.resolution is 96"):
        _run(cfg, (root, base, data), "vae4x_mismatch", resolution=96)


def test_changed_params_do_not_resume_from_stale_checkpoints(setup):
    out, _ = _run(train_config(steps=2), setup, "stale")
    _, s = _run(train_config(steps=2, learning_rate=5e-4), setup, "stale", stop_after=1)
    assert s["steps"] == 1  # started from 0, the old checkpoints (other lr) were discarded
    assert not (out / "ckpt" / "step-000002").exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(setup):
    cfg = train_config(steps=6, checkpoint_every=1, learning_rate=1e30, max_grad_norm=0.0, modules="unet",
                       weight_decay=0.0)
    with pytest.raises(TrainingDivergedError, match=r"loss is not finite at step \d+ .*Last good checkpoint: .*step-"):
        _run(cfg, setup, "nan")
    assert (setup[0] / "nan" / "ckpt").is_dir() and not (setup[0] / "nan" / "far").exists()


def test_missing_training_set_names_the_file(setup):
    with pytest.raises(InvalidInputError, match="nope.parquet: training set not found"):
        _run(train_config(), setup, "missing", data=setup[0] / "nope.parquet")


def _params(tmp: Path, **train_overrides) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for c in data["concepts"]["subjects"]:
        c["images"] = str(ROOT / c["images"])
    data["train"].update(train_overrides)
    data["train"]["refine"]["downscale"] = [16]
    data["model"]["resolution"] = RESOLUTION  # the test composites' size: the stage trains at model.resolution
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
def test_stage_killed_at_any_moment_resumes_to_the_same_weights(setup, tmp_path):
    """SIGKILL the real stage process mid-run (after its first checkpoint), rerun it, compare with a clean run."""
    root, base, data = setup
    params = _params(tmp_path, steps=6, checkpoint_every=2, log_every=2)
    env = project_env(OMP_NUM_THREADS="1")

    def cmd(name: str) -> list[str]:
        d = tmp_path / name
        return [sys.executable, "-m", "stages.train", "--base", str(base), "--data", str(data), "--out",
                str(d / "far"), "--checkpoints", str(d / "ckpt"), "--live", str(d / "live"), "--params", str(params)]

    subprocess.run(cmd("clean"), cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cmd("killed"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed/ckpt/step-000002").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/far").exists()
    done = subprocess.run(cmd("killed"), cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert "resuming from" in done.stdout and "train: 6/6 steps" in done.stdout
    a = (tmp_path / "clean/far" / DELTA_FILE).read_bytes()
    assert (tmp_path / "killed/far" / DELTA_FILE).read_bytes() == a


def test_stage_rejects_bad_params_with_exit_code_2(tmp_path):
    params = _params(tmp_path, modules="everything")
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--base", "x", "--data", "y", "--out", "z",
                           "--checkpoints", "c", "--params", str(params)], cwd=ROOT, env=project_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "train.modules: 'everything' is invalid" in proc.stderr
