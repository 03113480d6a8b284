"""far/subjects.py: instances from a foreground, the segment finder, the OWLv2 finder's plumbing and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from far.backbones import BackboneError
from far.config import EvalConfig, SegmentConfig
from far.errors import InvalidInputError
from far.subjects import Owlv2Finder, SegmentFinder, instances, make_finder
from tests._eval_inputs import composite


def test_instances_are_components_largest_first_and_specks_dropped() -> None:
    fg = np.zeros((100, 100), bool)
    fg[10:30, 10:30] = True  # 400 px
    fg[50:90, 60:90] = True  # 1200 px
    fg[0:2, 98:100] = True  # a 4 px speck: under 1 % of the image
    found = instances(fg, min_area=0.01)
    assert [s.bbox for s in found] == [(60, 50, 90, 90), (10, 10, 30, 30)]
    assert [s.score for s in found] == [0.12, 0.04]
    assert found[1].mask is not None and found[1].mask.sum() == 400 and not (found[0].mask & found[1].mask).any()
    assert len(instances(fg, min_area=0.0)) == 3 and instances(np.zeros((8, 8), bool), 0.0) == []


def test_segment_finder_takes_pil_or_arrays_and_refuses_other_input() -> None:
    image = composite(0)  # two real reference cut-outs on grey
    finder = SegmentFinder(lambda rgb: (np.abs(rgb.astype(int) - 128) > 6).any(-1), "not grey", 0.01)
    from_pil, from_array = finder(image, ["dog"]), finder(np.asarray(image), ["dog"])
    assert [s.bbox for s in from_pil] == [s.bbox for s in from_array] and len(from_pil) == 2
    assert sorted(s.bbox[0] for s in from_pil)[1] >= 128  # one subject in each half
    with pytest.raises(InvalidInputError, match=r"\(H, W, 3\) uint8"):
        finder(np.zeros((8, 8), np.float32), ["dog"])


def test_make_finder_refuses_provided_masks_and_names_a_missing_detector(tmp_path: Path, monkeypatch, caplog) -> None:
    with pytest.raises(InvalidInputError, match="segment.backend provided"):
        make_finder(EvalConfig(), SegmentConfig(backend="provided"))
    assert make_finder(EvalConfig(), SegmentConfig(backend="grabcut")).label.startswith("segment instances (grabcut")
    assert "at most one main subject" in caplog.text  # GrabCut keeps one subject: said, not silent
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = EvalConfig(subject_finder="owlv2", detector_model=str(tmp_path / "no-such-owlv2"))
    with pytest.raises(BackboneError, match=r"eval\.detector_model: .*no-such-owlv2.*eval\.subject_finder: segment"):
        make_finder(cfg, SegmentConfig())


def test_owlv2_finder_returns_boxes_inside_a_non_square_image(tmp_path: Path) -> None:
    """A tiny random OWLv2 saved and loaded like the real one: the plumbing, not detection quality."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from far.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Owlv2Config(text_config=layer | {"max_position_embeddings": 16},
                         vision_config=layer | {"image_size": 64, "patch_size": 16}, projection_dim=32)
    tokenizer = build_clip_tokenizer()
    tokenizer.model_max_length = 16
    Owlv2ForObjectDetection(config).save_pretrained(tmp_path)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                   tokenizer=tokenizer).save_pretrained(tmp_path)
    finder = make_finder(EvalConfig(subject_finder="owlv2", detector_model=str(tmp_path), detector_threshold=0.0),
                         SegmentConfig())
    assert isinstance(finder, Owlv2Finder) and finder.label.startswith("owlv2 ")
    image = composite(0).crop((0, 0, 256, 160))  # wider than tall: OWLv2 pads it to a square
    found = finder(image, ["dog", "dog"])
    assert found and all(0 <= s.bbox[0] < s.bbox[2] <= 256 and 0 <= s.bbox[1] < s.bbox[3] <= 160 for s in found)
    scores = [s.score for s in found]
    assert scores == sorted(scores, reverse=True) and all(0 <= v <= 1 for v in scores)
    assert Owlv2Finder(str(tmp_path), threshold=1.0)(image, ["dog"]) == []  # sigmoid scores never reach 1
    with pytest.raises(InvalidInputError, match="class words"):
        finder(Image.new("RGB", (8, 8)), [])
