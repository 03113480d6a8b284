"""far/config.py: params.yaml maps onto typed config; bad params give one line naming the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from far.config import SECTIONS, ParamsError, load_params
from tests.conftest import ROOT, TINY_PARAMS, run


def test_default_params_load_with_every_section():
    params = load_params(ROOT / "params.yaml")
    assert SECTIONS == ("model", "concepts", "segment", "priors", "fusion", "train", "sample", "eval", "report",
                        "orchestrate")
    assert [c.name for c in params.concepts.subjects] == ["world_dog_a", "world_dog_b"]
    assert params.model.pretrained == "world" and params.model.resolution == 64
    tiny = load_params(TINY_PARAMS)
    assert [c.name for c in tiny.concepts.subjects] == ["dog", "dog3"] and tiny.model.pretrained == "tiny"


def _error(params_file, edit) -> str:
    with pytest.raises(ParamsError) as info:
        load_params(params_file(edit))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_typo_in_section_name_is_named_with_a_suggestion(params_file):
    message = _error(params_file, lambda d: d.__setitem__("trian", d.pop("train")))
    assert "unknown key 'trian'" in message and "did you mean 'train'" in message


def test_typo_in_nested_key_is_named(params_file):
    message = _error(params_file, lambda d: d["train"]["refine"].__setitem__("wieght", 1.0))
    assert "unknown key 'train.refine.wieght'" in message and "'train.refine.weight'" in message


def test_negative_steps_names_key_and_value(params_file):
    message = _error(params_file, lambda d: d["train"].__setitem__("steps", -1))
    assert message.startswith(str(params_file()).rsplit("/", 1)[0]) or "params.yaml" in message
    assert "train.steps: -1 is invalid" in message


def test_wrong_type_names_key_and_value(params_file):
    message = _error(params_file, lambda d: d["sample"].__setitem__("guidance_scale", "high"))
    assert "sample.guidance_scale: 'high' is invalid" in message


def test_missing_concept_folder_is_named(params_file):
    message = _error(params_file, lambda d: d["concepts"]["subjects"][1].__setitem__("images", "no/such/dir"))
    assert "concepts.subjects.1.images" in message and "no/such/dir" in message


def test_duplicate_tokens_are_rejected(params_file):
    def same_token(d):
        d["concepts"]["subjects"][1]["token"] = d["concepts"]["subjects"][0]["token"]

    message = _error(params_file, same_token)
    assert message.endswith("concepts.subjects.1.token: '<far-dog>' is already used by subjects.0"), message
    assert "data/concepts" not in message  # the section's whole value is not printed


def test_resolution_must_suit_the_tiny_model(params_file):
    message = _error(params_file, lambda d: d["model"].__setitem__("resolution", 100))
    assert "model.resolution: 100 is invalid" in message and "multiple of 64" in message
    assert "unet_channels" not in message

    def three_vae_levels(d):  # a VAE that downsamples 4x: 32 px steps
        d["model"]["tiny"]["vae_channels"] = [16, 32, 64]
        d["model"]["resolution"] = 96

    p = load_params(params_file(three_vae_levels))
    assert p.model.resolution == 96
    message = _error(params_file, lambda d: (three_vae_levels(d), d["model"].__setitem__("resolution", 80)))
    assert "model.resolution: 80 is invalid: must be a multiple of 32 (the tiny VAE downsamples 4x" in message


def test_invalid_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_stage_exits_nonzero_with_one_line(params_file, tmp_path: Path):
    bad = params_file(lambda d: d["train"].__setitem__("steps", -1))
    proc = run([sys.executable, "-m", "stages.base_model", "--out", str(tmp_path / "base"), "--params", str(bad)],
               cwd=ROOT, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.steps: -1 is invalid" in lines[0], proc.stderr
    assert not (tmp_path / "base").exists()


def test_check_params_checks_the_concept_images_as_the_segment_stage_does(params_file, tmp_path: Path):
    check = [sys.executable, "-m", "far.cli", "check-params"]
    ok = run([*check, str(params_file())], cwd=ROOT)
    assert "dog=<far-dog> dog (5 images)" in ok.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run([*check, str(params_file(lambda d: d["concepts"]["subjects"][1].__setitem__("images", str(empty))))],
               cwd=ROOT, check=False)
    assert proc.returncode == 2 and f"{empty}: concept image folder is empty" in proc.stderr, proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "00.jpg").write_bytes(b"not a jpeg")
    proc = run([*check, str(params_file(lambda d: d["concepts"]["subjects"][0].__setitem__("images", str(broken))))],
               cwd=ROOT, check=False)
    assert proc.returncode == 2 and "00.jpg: not an image file" in proc.stderr, proc.stderr


def test_yaml_12_as_dvc_writes_it(params_file):
    # `dvc exp run -S ...` rewrites params.yaml as YAML 1.2: the string "no" comes back unquoted.
    path = params_file(lambda d: d["train"].__setitem__("mixed_precision", "no"))
    path.write_text(path.read_text().replace("mixed_precision: 'no'", "mixed_precision: no"))
    assert "mixed_precision: no\n" in path.read_text()
    assert load_params(path).train.mixed_precision == "no"


def test_real_scale_config_validates():
    params = load_params(ROOT / "configs/sd21-gpu.yaml")
    assert params.model.pretrained == "stabilityai/stable-diffusion-2-1-base" and params.model.resolution == 512
    assert params.train.mixed_precision == "bf16" and params.segment.backend == "rembg"
    assert (params.eval.clip_model, params.eval.dino_model) == ("ViT-B/32", "facebook/dino-vits16")
