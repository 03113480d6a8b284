"""far/backbones.py: the tiny CLIP / DINO go through clip.load / from_pretrained, and CLIP-T matches torchmetrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from far.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneError,
    build_tiny_clip,
    clip_to_hf,
    dino_preprocess,
    load_clip,
    load_dino,
)
from far.metrics import clip_t, clipscore, mean_pairwise

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def photos(concept: str, n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        with Image.open(ROOT / "data" / "concepts" / concept / f"{i:02d}.jpg") as im:
            out.append(ImageOps.exif_transpose(im).convert("RGB"))
    return out


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("backbones")
    return load_clip("tiny", work, CPU), load_dino("tiny", work, CPU), work


def test_tiny_clip_is_a_clip_anytorch_checkpoint_loaded_by_clip_load(backbones, tmp_path: Path) -> None:
    import clip
    from clip.model import CLIP

    clip_bb, _, work = backbones
    assert isinstance(clip_bb.model, CLIP) and clip_bb.model.visual.input_resolution == 224
    assert "NOT comparable" in clip_bb.name
    # The saved file is an fp16 state dict (like OpenAI's), and clip.load returns exactly those values.
    saved = torch.load(work / "tiny_clip.pt", map_location="cpu")
    assert all(v.dtype == torch.float16 for v in saved.values())
    loaded = clip_bb.model.state_dict()
    assert all(torch.equal(loaded[k].half(), v) for k, v in saved.items())
    # A path given as eval.clip_model takes the same route and gives the same weights (hash); rebuilding is
    # deterministic and another seed gives other weights.
    again = load_clip(str(build_tiny_clip(tmp_path / "copy.pt", seed=0)), tmp_path, CPU)
    assert again.sha256 == clip_bb.sha256 and again.name.startswith("clip ")
    other = load_clip(str(build_tiny_clip(tmp_path / "other.pt", seed=1)), tmp_path, CPU)
    assert other.sha256 != clip_bb.sha256
    assert clip.available_models()  # real names remain accepted values


def test_clip_t_equals_torchmetrics_clipscore_over_100(backbones) -> None:
    """Same weights on both sides: clip-anytorch (ours) and the HF CLIPModel torchmetrics runs."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPImageProcessor, CLIPProcessor

    from far.tokenizer import build_clip_tokenizer

    clip_bb, _, _ = backbones
    hf = clip_to_hf(clip_bb.model)

    class Features(torch.nn.Module):
        """torchmetrics 1.9 expects tensors from get_*_features; transformers >= 5 returns the projected
        embedding as `.pooler_output` of a ModelOutput (torchmetrics issue #3407, fixed upstream by #3408)."""

        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=build_clip_tokenizer())
    images = photos("dog", 3) + photos("dog3", 3)  # 256 px short side: both sides resize + crop to 224
    texts = ["a photo of a dog", "a dog on the beach", "a red cube", "a dog in the jungle", "a cat", "snow"]
    ours = clip_t(clip_bb.embed_images(images), clip_bb.embed_texts(texts))
    theirs = []
    for image, text in zip(images, texts, strict=True):
        metric = CLIPScore(model_name_or_path=lambda: (Features(hf), processor))
        metric.update(torch.from_numpy(np.array(image)).permute(2, 0, 1), text)
        theirs.append(float(metric.compute()))
    theirs = torch.tensor(theirs)
    assert (ours > 0).any() and (ours < 0).any(), "need both signs to check CLIP-T and the max(.,0) of CLIPScore"
    positive = ours > 0
    torch.testing.assert_close(ours[positive], theirs[positive] / 100, atol=1e-4, rtol=0)
    torch.testing.assert_close(clipscore(ours) / 100, theirs / 100, atol=1e-4, rtol=0)


def test_identical_images_score_one_and_different_ones_less(backbones) -> None:
    clip_bb, dino_bb, _ = backbones
    images = photos("dog", 2) + photos("dog3", 1)
    for bb in (clip_bb, dino_bb):
        emb = bb.embed_images(images, batch_size=2)
        assert emb.shape[0] == 3
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
        same = mean_pairwise(emb[:1], emb[:1])
        torch.testing.assert_close(same, torch.ones(1), atol=1e-5, rtol=0)
        assert float(mean_pairwise(emb[:1], emb[1:])[0]) < 1 - 1e-4
        # batching does not change an embedding
        torch.testing.assert_close(bb.embed_images(images[:1]), emb[:1], atol=1e-5, rtol=0)


def test_tiny_dino_is_a_vit_loaded_with_from_pretrained(backbones, tmp_path: Path) -> None:
    from transformers import ViTModel

    _, dino_bb, work = backbones
    assert isinstance(dino_bb.model, ViTModel) and (work / "tiny_dino" / "model.safetensors").is_file()
    assert dino_bb.model.config.patch_size == 16 and "NOT comparable" in dino_bb.name
    local = load_dino(str(work / "tiny_dino"), tmp_path, CPU)  # a local directory takes the real-model route
    assert local.sha256 == dino_bb.sha256 and local.name == f"dino {work / 'tiny_dino'}"


def test_dino_preprocessing_is_resize_256_centre_crop_224_imagenet() -> None:
    image = Image.new("RGB", (512, 300), (200, 100, 50))
    image.paste((0, 0, 0), (0, 0, 60, 300))  # a black band that the centre crop removes
    x = dino_preprocess()(image)
    assert x.shape == (3, 224, 224)  # 512x300 -> 437x256 -> 224x224 centre
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected.float(), atol=1e-3, rtol=0)


def test_unknown_backbones_fail_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="eval.clip_model: 'no/such.pt'"):
        load_clip("no/such.pt", tmp_path, CPU)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="could not be loaded by clip.load"):
        load_clip(str(tmp_path / "junk.pt"), tmp_path, CPU)
    with pytest.raises(BackboneError, match="eval.dino_model: '/no/such/dir'"):
        load_dino("/no/such/dir", tmp_path, CPU)


def test_batched_preprocessing_is_bitwise_the_per_image_transform(backbones) -> None:
    from far.backbones import to_batch

    clip_bb, dino_bb, _ = backbones
    images = photos("dog", 2) + [Image.new("L", (300, 200), 90)]  # a grey-scale image is converted to RGB too
    for pre in (clip_bb.preprocess, dino_bb.preprocess):
        assert torch.equal(to_batch(pre, images), torch.stack([pre(im) for im in images]))
