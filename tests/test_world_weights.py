"""far/world/weights.py: `far world export`, the hash manifest, and `model.pretrained: world` in base_model.

A tiny randomly initialised world pipeline, oracle and CLIP are exported by the real exporter into a
temporary folder, so these tests never depend on the shipped weights; the last test checks those.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from far.config import ModelConfig
from far.io import file_sha256, write_json
from far.models import SOURCE_FILE, load_base_pipeline, prepare_base_model
from far.world import paths
from far.world.clip import ClipTrainConfig, build_clip, save_clip
from far.world.model import WorldModelConfig, assemble_pipeline, build_text_encoder, build_unet, build_vae
from far.world.oracle import Oracle, PixelNet, SubjectNet
from far.world.weights import PRETRAIN_RECORD, WorldWeightsError, export_weights, run_record, verified_path

TINY = WorldModelConfig(resolution=64, vae_channels=(16, 16, 16), unet_channels=(16, 32), unet_attention=(False, True),
                        text_hidden_size=32, text_layers=1)
PRETRAIN_CMD = "far world pretrain --work .world/tiny --steps 7"
UNET = "base/unet/diffusion_pytorch_model.safetensors"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Inputs of an export (snapshot, oracle, CLIP with provenance records) and its result, via the CLI."""
    from far.world.cli import app

    root = tmp_path_factory.mktemp("world")
    snapshot = root / "snapshots" / "step-7"
    pipe = assemble_pipeline(build_vae(TINY, 0), build_text_encoder(TINY, 1), build_unet(TINY, 2))
    pipe.save_pretrained(snapshot, safe_serialization=True)
    write_json(snapshot / PRETRAIN_RECORD, {"config": {"seed": 0, "vae_steps": 3}, "step": 7}
               | run_record(PRETRAIN_CMD, 0, 7, 12.5))
    oracle = root / "oracle.safetensors"
    torch.manual_seed(0)
    Oracle(PixelNet(8), SubjectNet(8), 64).save(oracle, seed=11, steps=5)
    write_json(root / "oracle.safetensors.json", run_record("far world oracle --steps 5", 11, 5, 3.0))
    clip_ckpt = root / "clip.pt"
    small = ClipTrainConfig(width=64, layers=1, vision_width=128, vision_layers=1, embed_dim=16, patch=16)
    save_clip(build_clip(small), clip_ckpt)
    clip_record = root / "clip-run.json"
    write_json(clip_record, run_record("far world clip --steps 4", 2000, 4, 2.0))
    dest = root / "weights"
    result = CliRunner().invoke(app, ["export", "--snapshot", str(snapshot), "--oracle", str(oracle),
                                      "--clip", str(clip_ckpt), "--clip-record", str(clip_record), "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    return {"root": root, "snapshot": snapshot, "oracle": oracle, "clip": clip_ckpt, "weights": dest}


@pytest.fixture
def weights(made, tmp_path, monkeypatch) -> Path:
    """A private copy of the exported folder, installed as far/world/weights for this test."""
    copy = tmp_path / "weights"
    shutil.copytree(made["weights"], copy)
    monkeypatch.setattr(paths, "WEIGHTS", copy)
    return copy


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "MANIFEST.json").read_text())


def test_export_writes_fp16_weights_and_a_manifest_of_every_file(made):
    folder, manifest = made["weights"], _manifest(made["weights"])
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == on_disk
    assert {UNET, "base/model_index.json", "base/tokenizer/tokenizer_config.json",
            "base/scheduler/scheduler_config.json", "oracle.safetensors", "clip.pt"} <= on_disk
    for rel, entry in manifest["files"].items():
        assert entry == {"sha256": file_sha256(folder / rel), "size": (folder / rel).stat().st_size}
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        shipped = _tensors(folder / "base" / f"{part}.safetensors")
        source = _tensors(made["snapshot"] / f"{part}.safetensors")
        assert shipped.keys() == source.keys()
        assert all(t.dtype == torch.float16 and torch.equal(t, source[k].half()) for k, t in shipped.items())
    assert file_sha256(folder / "oracle.safetensors") == file_sha256(made["oracle"])
    # Provenance: from the snapshot's own record, the oracle's sidecar and the explicit --clip-record.
    assert manifest["unknown"] == {}
    assert manifest["base"]["command"] == PRETRAIN_CMD and manifest["base"]["steps"] == 7
    assert manifest["oracle"]["seed"] == 11 and manifest["clip"]["wall_time_s"] == 2.0
    for name in ("base", "oracle", "clip"):
        assert manifest[name]["machine"]["cpu"] and manifest[name]["date"]
    assert manifest["command"].startswith(f"far world export --snapshot {made['snapshot']} ")
    assert manifest["remake"] == " && ".join(
        [PRETRAIN_CMD, "far world oracle --steps 5", "far world clip --steps 4", manifest["command"]])


def test_export_refuses_unknown_provenance_and_writes_nothing(made, tmp_path):
    bare_oracle = tmp_path / "oracle.safetensors"  # no sidecar record: command, wall time, machine unknown
    shutil.copyfile(made["oracle"], bare_oracle)
    args = (made["snapshot"], bare_oracle, made["clip"], {"clip": made["root"] / "clip-run.json"})
    with pytest.raises(WorldWeightsError, match=r"oracle: \['command', 'wall_time_s', 'machine'\] \(--oracle-record\)"):
        export_weights(*args, dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = export_weights(*args, dest=tmp_path / "out", allow_unknown=True)
    assert manifest["unknown"] == {"oracle": ["command", "wall_time_s", "machine"]}
    assert manifest["command"].endswith("--allow-unknown-provenance")


def test_world_base_model_installs_in_fp32_with_its_provenance(weights, made, tmp_path):
    out = tmp_path / "models" / "base"
    record = prepare_base_model(ModelConfig(pretrained="world", resolution=64), out)
    saved = json.loads((out / SOURCE_FILE).read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["source"] == "world" and saved["pretrained"] == "world"
    assert saved["provenance"]["command"] == PRETRAIN_CMD
    # The base's own record only: re-exporting another part (its date, command, entry) leaves models/base alone.
    assert not {"date", "command", "remake", "oracle", "clip", "manifest_sha256"} & set(saved)
    assert saved["files"][UNET]["sha256"] == file_sha256(weights / UNET)
    unet = _tensors(out / "unet" / "diffusion_pytorch_model.safetensors")
    shipped = _tensors(weights / UNET)
    assert all(t.dtype == torch.float32 and torch.equal(t, shipped[k].float()) for k, t in unet.items())
    # No file records where this copy of the weights lives (diffusers writes the folder it loaded from):
    # models/base must be the same bytes in every clone.
    configs = [f for f in out.rglob("*.json") if f.name != SOURCE_FILE]
    where = (str(weights), str(weights.resolve()))
    assert configs and not [f for f in configs if any(w in f.read_text() for w in where)]
    pipe = load_base_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red dog on the grass", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_world_base_model_names_the_resolution_it_was_trained_at(weights, tmp_path):
    out = tmp_path / "base"
    with pytest.raises(WorldWeightsError, match=r"model.resolution: 128 .* trained at 64 px; set model.resolution: 64"):
        prepare_base_model(ModelConfig(pretrained="world", resolution=128), out)
    assert not out.exists()


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "word"), [(_tamper, "altered"), (_truncate, "truncated"),
                                              (Path.unlink, "missing")])
def test_a_damaged_weight_file_stops_base_model_with_one_error(weights, tmp_path, damage, word):
    target = weights / UNET
    expected = _manifest(weights)["files"][UNET]["sha256"]
    damage(target)
    found = file_sha256(target) if target.exists() else "no file"
    out = tmp_path / "models" / "base"
    with pytest.raises(WorldWeightsError) as err:
        prepare_base_model(ModelConfig(pretrained="world", resolution=64), out)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{target}: {word}" in msg and f"expected sha256 {expected}, found {found}" in msg
    assert f"Remake the world weights: {PRETRAIN_CMD} && " in msg and "far world export --snapshot" in msg
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing half-copied, no temporary left


def test_an_unlisted_file_or_a_missing_manifest_stops_base_model(weights, tmp_path):
    extra = weights / "base" / "unet" / "extra.safetensors"
    extra.write_bytes(b"not in the manifest")
    with pytest.raises(WorldWeightsError, match=f"{extra}: not in MANIFEST.json: expected no such file, found sha256 "
                                                f"{file_sha256(extra)}"):
        prepare_base_model(ModelConfig(pretrained="world", resolution=64), tmp_path / "a")
    (weights / "MANIFEST.json").unlink()
    with pytest.raises(WorldWeightsError, match=r"MANIFEST.json is missing, .* Remake them: far world pretrain"):
        prepare_base_model(ModelConfig(pretrained="world", resolution=64), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_oracle_and_clip_load_only_through_their_checked_hash(weights):
    import clip

    oracle = Oracle.load(verified_path("oracle.safetensors"))
    assert oracle.resolution == 64 and oracle.pixel.stem.out_channels == 8
    model, _ = clip.load(str(verified_path("clip.pt")), device="cpu", jit=False)
    assert model.visual.input_resolution == 64
    assert model.visual.conv1.out_channels == 128 and model.ln_final.weight.shape == (64,)  # towers of two widths
    _truncate(weights / "clip.pt")
    with pytest.raises(WorldWeightsError, match=r"clip.pt: truncated .* expected sha256 [0-9a-f]{64}, found"):
        verified_path("clip.pt")
    verified_path("oracle.safetensors")  # the other files still check out


@pytest.mark.skipif(not paths.MANIFEST.is_file(), reason="far/world/weights not exported yet (far world export)")
def test_the_shipped_weights_match_their_manifest_and_sample_64px():
    from diffusers import StableDiffusionPipeline

    for name in ("base", "oracle.safetensors", "clip.pt"):
        verified_path(name)
    pipe = StableDiffusionPipeline.from_pretrained(verified_path("base"), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.float()
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red dog with blue ears on the grass", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01
