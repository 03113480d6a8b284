"""far/segment.py, far/grabcut.py and stages/segment.py on real photos (data/concepts, tests/data/dreambench)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from far.config import SegmentConfig
from far.cosegment import cosegment_coarse, segment_concept
from far.errors import INVALID_INPUT
from far.grabcut import letterbox, segment_grabcut, segment_rect_grabcut
from far.images import load_rgb
from far.segment import (
    Segmenter,
    SegmentError,
    bbox,
    find_rembg_model,
    mask_quality,
    rembg_model_candidates,
    segment,
)
from tests.conftest import ROOT, run

sys.path.insert(0, str(ROOT / "bench"))
from segment_quality import outline_reference  # noqa: E402

CONCEPTS = ROOT / "data" / "concepts"
DREAMBENCH = ROOT / "tests" / "data" / "dreambench"  # the DreamBench photos these tests read (CC-BY-4.0, README there)
MANIFEST_COLUMNS = ["concept", "class_word", "source", "image", "mask", "cutout", "width", "height",
                    "area_fraction", "bbox", "backend", "quality"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


# ---------------------------------------------------------------------------------------------- grabcut
def test_grabcut_matches_a_careful_mask_on_a_shipped_photo():
    """data/concepts/dog3/03.jpg is DreamBench dog3/03 at 256 px: its hand outline (bench data) scaled by 1/2."""
    outline = json.loads((ROOT / "bench/data/segment/outlines.json").read_text())["splits"]["heldout"]["dog3/03.jpg"]
    rgb = load_rgb(CONCEPTS / "dog3" / "03.jpg")
    ref = outline_reference(rgb, (np.array(outline) / 2).round().astype(int).tolist(), band=4)
    mask = segment_grabcut(rgb)
    assert mask.shape == rgb.shape[:2] and mask.dtype == bool
    assert iou(mask, ref) > 0.9
    assert np.array_equal(mask, segment_grabcut(rgb))  # deterministic (seeded OpenCV RNG)


def test_grabcut_is_exact_on_a_cutout_with_known_alpha_where_rect_grabcut_fails():
    cartoon = load_rgb(DREAMBENCH / "red_cartoon" / "00.jpg")  # drawn on white: the alpha is exact
    alpha = (255 - cartoon.min(axis=2)) > 40
    ys, xs = np.nonzero(alpha)
    fg, a = cartoon[ys.min():ys.max() + 1, xs.min():xs.max() + 1], alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fg = cv2.resize(fg, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    a = cv2.resize(a.astype(np.uint8), (fg.shape[1], fg.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    a = cv2.morphologyEx(a.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8)) > 0
    bg = cv2.resize(load_rgb(DREAMBENCH / "fancy_boot" / "01.jpg")[:160, :160], (512, 512))  # city + river
    img, ref = bg.copy(), np.zeros((512, 512), bool)
    img[150:150 + fg.shape[0], 150:150 + fg.shape[1]][a] = fg[a]
    ref[150:150 + fg.shape[0], 150:150 + fg.shape[1]] = a
    ours = iou(segment_grabcut(img), ref)
    assert ours > 0.95
    assert iou(segment_rect_grabcut(img), ref) < ours - 0.2  # the baseline keeps much of the city


def test_letterbox_bars_are_found_and_stay_background():
    rgb = load_rgb(CONCEPTS / "dog3" / "03.jpg")
    boxed = np.zeros((rgb.shape[0], rgb.shape[1] + 80, 3), np.uint8)
    boxed[:, 40:-40] = rgb
    assert letterbox(boxed) == (0, rgb.shape[0], 40, rgb.shape[1] + 40)
    assert letterbox(rgb) == (0, rgb.shape[0], 0, rgb.shape[1])
    orange = np.full((256, 256, 3), (230, 100, 40), np.uint8)  # a plain studio backdrop is not a bar
    assert letterbox(orange) == (0, 256, 0, 256)
    mask = segment_grabcut(boxed)
    assert not mask[:, :40].any() and not mask[:, -40:].any()
    assert iou(mask[:, 40:-40], segment_grabcut(rgb)) > 0.97


# -------------------------------------------------------------------------------------------- cosegment
def test_cosegmentation_of_a_shipped_concept_folder_gives_plausible_masks():
    images = [load_rgb(p) for p in sorted((CONCEPTS / "dog3").glob("*.jpg"))[:4]]
    seg = Segmenter(SegmentConfig(backend="grabcut"))
    masks = seg.concept(images, [Path(f"{i}.jpg") for i in range(len(images))])
    assert len(masks) == len(images) >= 3
    for rgb, mask in zip(images, masks, strict=True):
        assert mask.shape == rgb.shape[:2] and mask.dtype == bool
        assert 0.05 < mask.mean() < 0.8 and mask_quality(mask, 0.01, 0.98) == "ok"
        assert not mask[0].any() and not mask[-1].any()  # the border band stays background
    assert all(np.array_equal(a, b) for a, b in zip(masks, segment_concept(images), strict=True))  # deterministic
    single = Segmenter(SegmentConfig(backend="grabcut", cosegment=False)).concept(images[:2], [Path("a"), Path("b")])
    assert all(np.array_equal(m, segment_grabcut(x)) for m, x in zip(single, images[:2], strict=True))
    assert np.array_equal(segment_concept(images[:1])[0], segment_grabcut(images[0]))  # one photo: single path


def test_cosegment_coarse_keeps_a_lone_picture():
    small = cv2.resize(load_rgb(CONCEPTS / "dog3" / "03.jpg"), (128, 128), interpolation=cv2.INTER_AREA)
    coarse = np.zeros((128, 128), bool)
    coarse[30:100, 30:100] = True
    assert cosegment_coarse([small], [coarse])[0] is coarse


@pytest.mark.slow
def test_the_subjects_other_photos_fix_a_mask_single_image_grabcut_gets_wrong():
    """DreamBench teapot/04 (bench `tune` split): alone, GrabCut keeps the stone block under the teapot. With the
    teapot's other photos (no block there) the shared colour model removes it; with another subject's photos
    (DreamBench `candle`: white jars, wooden lids) as companions it does not, so the gain comes from the shared
    subject model, not from running the cut twice."""
    outline = json.loads((ROOT / "bench/data/segment/outlines.json").read_text())["splits"]["tune"]["teapot/04.jpg"]
    rgb = load_rgb(DREAMBENCH / "teapot" / "04.jpg")
    ref = outline_reference(rgb, outline, band=8)
    teapots = [load_rgb(p) for p in sorted((DREAMBENCH / "teapot").glob("*.jpg")) if p.name != "04.jpg"]
    candles = [load_rgb(p) for p in sorted((DREAMBENCH / "candle").glob("*.jpg"))[:4]]
    alone = iou(segment_grabcut(rgb), ref)
    together = iou(segment_concept([rgb, *teapots])[0], ref)
    assert alone < 0.5 and together > 0.9
    assert iou(segment_concept([rgb, *candles])[0], ref) < 0.5


# ---------------------------------------------------------------------------------------------- quality
def test_mask_quality_flags():
    m = np.zeros((100, 100), bool)
    assert mask_quality(m, 0.01, 0.98) == "empty"
    m[40:60, 40:60] = True
    assert mask_quality(m, 0.01, 0.98) == "ok"
    m[0:10, 0:50] = True  # a second blob of 500 px: the largest piece holds 400/900 < 80 %
    assert mask_quality(m, 0.01, 0.98) == "fragmented"
    assert mask_quality(np.ones((100, 100), bool), 0.01, 0.98) == "full"
    one = np.zeros((100, 100), bool)
    one[0, 0] = True
    assert mask_quality(one, 0.01, 0.98) == "empty"  # under min_area


def test_bbox_has_exclusive_end():
    m = np.zeros((50, 60), bool)
    m[10:20, 5:7] = True
    assert bbox(m) == [5, 10, 7, 20]
    assert bbox(np.zeros((5, 5), bool)) == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------------------ rembg
U2NETP = find_rembg_model(SegmentConfig(rembg_model="u2netp"))
needs_u2netp = pytest.mark.skipif(U2NETP is None, reason="u2netp weights not installed (`make weights`)")


@needs_u2netp
def test_default_u2netp_matches_careful_masks_where_grabcut_fails():
    """The default backend (auto -> rembg u2netp) on three real tune photos where co-segmented GrabCut is below 0.7
    (a small candle, a backpack in front of a window, a white bowl on white cloth: bench/segment_quality.py)."""
    spec = json.loads((ROOT / "bench/data/segment/outlines.json").read_text())
    seg = Segmenter(SegmentConfig())
    assert seg.backend == "rembg" and seg.label == "rembg:u2netp@sha256:309c8469258d"
    for name in ("candle/00.jpg", "backpack_dog/00.jpg", "berry_bowl/00.jpg"):
        rgb = load_rgb(DREAMBENCH / name)
        ref = outline_reference(rgb, spec["splits"]["tune"][name], spec["band_px"])
        mask = seg(rgb)
        assert iou(mask, ref) > 0.85, name
        assert iou(segment_grabcut(rgb), ref) < 0.7, name
        assert np.array_equal(mask, seg(rgb))  # deterministic


@needs_u2netp
def test_default_stage_records_the_weights_it_used(tmp_path: Path, params_file):
    out = tmp_path / "segmented"
    run([sys.executable, "-m", "stages.segment", "--out", str(out), "--params", str(params_file())], ROOT)
    df = check_layout(out, 10)
    assert set(df.backend) == {"rembg:u2netp@sha256:309c8469258d"} and (df.quality == "ok").all()


@pytest.fixture
def rembg_unimportable(monkeypatch):
    """`import rembg` / `import onnxruntime` fail (seconds to import, and a download in rembg's own lookup): the
    paths that use this fixture must decide without them, so an attempt shows up as the wrong error."""
    for name in ("rembg", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)


def test_rembg_missing_model_fails_without_loading_rembg_and_says_what_to_do(tmp_path: Path, monkeypatch,
                                                                             rembg_unimportable):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net"))
    rgb = load_rgb(CONCEPTS / "dog" / "00.jpg")
    cfg = SegmentConfig(backend="rembg", rembg_model="isnet-general-use")
    with pytest.raises(SegmentError) as err:
        segment(rgb, "rembg", cfg)
    assert str(tmp_path / "u2net" / "isnet-general-use.onnx") in str(err.value)  # where it looked
    assert "Copy isnet-general-use.onnx there" in str(err.value) and "backend: grabcut" in str(err.value)
    assert "pip install" not in str(err.value)  # decided before any import of rembg
    missing = tmp_path / "models" / "u2net.onnx"
    with pytest.raises(SegmentError, match=str(missing)):
        Segmenter(SegmentConfig(backend="rembg", rembg_model_path=missing))


def test_rembg_model_lookup_follows_rembg_layouts(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("U2NET_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    want = [tmp_path / "rembg/models/u2net/u2net.onnx", tmp_path / ".u2net/u2net.onnx"]
    assert rembg_model_candidates("u2net") == want
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "h"))
    assert rembg_model_candidates("u2net") == [tmp_path / "h/models/u2net/u2net.onnx", tmp_path / "h/u2net.onnx"]


def test_auto_falls_back_to_grabcut_with_a_warning(tmp_path: Path, monkeypatch, caplog, rembg_unimportable):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "empty"))
    rgb = load_rgb(CONCEPTS / "dog3" / "03.jpg")
    with caplog.at_level(logging.WARNING):
        seg = Segmenter(SegmentConfig(backend="auto"))
    assert seg.backend == "grabcut" and "using grabcut" in caplog.text
    assert str(tmp_path / "empty") in caplog.text  # the warning says where the model was looked for
    assert np.array_equal(seg(rgb), segment_grabcut(rgb))


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("rembg") is not None, reason="rembg is installed")
def test_rembg_without_the_extra_installed_is_a_clear_error(tmp_path: Path, monkeypatch):
    home = tmp_path / "u2net"
    home.mkdir()
    (home / "u2net.onnx").write_bytes(b"not loaded: the import fails first")
    monkeypatch.setenv("U2NET_HOME", str(home))
    with pytest.raises(SegmentError, match=r"pip install 'far\[rembg\]'"):
        Segmenter(SegmentConfig(backend="rembg"))
    assert Segmenter(SegmentConfig(backend="auto")).backend == "grabcut"  # model present, package missing


# --------------------------------------------------------------------------------------------- provided
def test_provided_masks(tmp_path: Path):
    shutil.copy(CONCEPTS / "dog" / "00.jpg", tmp_path / "00.jpg")
    rgb = load_rgb(tmp_path / "00.jpg")
    cfg = SegmentConfig(backend="provided")
    with pytest.raises(SegmentError, match=r"expects its mask at .*00_mask\.png, which is missing"):
        segment(rgb, "provided", cfg, tmp_path / "00.jpg")
    Image.fromarray(np.zeros(rgb.shape[:2], np.uint8)).save(tmp_path / "00_mask.png")
    with pytest.raises(SegmentError, match=r"00_mask\.png: mask has no foreground"):
        segment(rgb, "provided", cfg, tmp_path / "00.jpg")
    want = np.zeros(rgb.shape[:2], bool)
    want[50:200, 60:180] = True
    Image.fromarray(want.astype(np.uint8) * 255).save(tmp_path / "00_mask.png")
    assert np.array_equal(segment(rgb, "provided", cfg, tmp_path / "00.jpg"), want)


# ------------------------------------------------------------------------------------------------ stage
def check_layout(out: Path, n: int, base: Path = ROOT) -> pd.DataFrame:
    df = pd.read_parquet(out / "manifest.parquet")
    assert list(df.columns) == MANIFEST_COLUMNS and len(df) == n
    for row in df.itertuples():
        image, mask, cut = png(out / row.image), png(out / row.mask), png(out / row.cutout)
        rgb = load_rgb(base / row.source)  # relative sources are relative to the project root
        assert np.array_equal(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), rgb)  # the image as loaded
        assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255} and mask.shape == (row.height, row.width)
        assert cut.shape == (row.height, row.width, 4) and np.array_equal(cut[..., 3], mask)
        assert abs(row.area_fraction - (mask > 0).mean()) < 1e-9
        assert list(row.bbox) == bbox(mask > 0)
        assert row.quality == mask_quality(mask > 0, 0.01, 0.98)
    return df


def grabcut_params(data):
    data["segment"]["backend"] = "grabcut"


def test_stage_on_the_shipped_concepts(tmp_path: Path, params_file):
    out = tmp_path / "segmented"
    params = str(params_file(grabcut_params))
    proc = run([sys.executable, "-m", "stages.segment", "--out", str(out), "--params", params], ROOT)
    assert "segment: 10 reference images of 2 concepts" in proc.stdout
    df = check_layout(out, 10)
    assert sorted(df.concept.unique()) == ["dog", "dog3"] and set(df.class_word) == {"dog"}
    assert set(df.backend) == {"grabcut"}
    assert (df.area_fraction > 0.1).all() and (df.quality != "empty").all()
    assert df.image.tolist()[:2] == ["dog/00.png", "dog/01.png"]
    dog = df[df.concept == "dog"]  # segment.cosegment (default): the concept's photos are segmented together
    for row, want in zip(dog.itertuples(), segment_concept([load_rgb(ROOT / s) for s in dog.source]), strict=True):
        assert np.array_equal(png(out / row.mask) > 0, want)
    assert not list(tmp_path.glob(".segmented.tmp-*"))


def test_a_corrupt_image_fails_the_stage_and_leaves_no_output(tmp_path: Path, params_file):
    bad = tmp_path / "dog_bad"
    shutil.copytree(CONCEPTS / "dog", bad)
    (bad / "03.jpg").write_bytes((CONCEPTS / "dog" / "03.jpg").read_bytes()[:2000])

    def edit(data):
        data["concepts"]["subjects"][0]["images"] = str(bad)

    out = tmp_path / "segmented"
    proc = run([sys.executable, "-m", "stages.segment", "--out", str(out), "--params", str(params_file(edit))], ROOT,
               check=False)
    assert proc.returncode == INVALID_INPUT
    assert f"{bad / '03.jpg'}: corrupt or truncated" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".segmented.tmp-*"))

    def skip(data):
        edit(data)
        data["segment"]["on_bad_image"] = "skip"

    proc = run([sys.executable, "-m", "stages.segment", "--out", str(out), "--params", str(params_file(skip))], ROOT)
    assert "03.jpg" in proc.stderr and "skipping" in proc.stderr
    assert (pd.read_parquet(out / "manifest.parquet").concept == "dog").sum() == 4


def test_stage_with_provided_masks(tmp_path: Path, params_file):
    folder = tmp_path / "dog"
    folder.mkdir()
    for stem in ("00", "01"):
        shutil.copy(CONCEPTS / "dog" / f"{stem}.jpg", folder / f"{stem}.jpg")
        m = np.zeros((256, 256), np.uint8)
        m[30:220, 40:200] = 255
        Image.fromarray(m).save(folder / f"{stem}_mask.png")

    def edit(data):
        data["concepts"]["subjects"] = [data["concepts"]["subjects"][0] | {"images": str(folder)}]
        data["segment"]["backend"] = "provided"

    out = tmp_path / "segmented"
    run([sys.executable, "-m", "stages.segment", "--out", str(out), "--params", str(params_file(edit))], ROOT)
    df = check_layout(out, 2)  # the mask files are not taken for reference images
    assert set(df.backend) == {"provided"} and df.bbox.map(list).tolist() == [[40, 30, 200, 220]] * 2


def test_standalone_far_segment_command(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from far.cli import app

    files = tmp_path / "in"
    files.mkdir()
    shutil.copy(CONCEPTS / "dog3" / "01.jpg", files / "a.jpg")
    out = tmp_path / "masks"
    monkeypatch.chdir(tmp_path)  # no params.yaml here: standalone mode uses the segment defaults
    result = CliRunner().invoke(app, ["segment", str(CONCEPTS / "dog3" / "03.jpg"), str(files), "--out", str(out),
                                      "--backend", "grabcut"])
    assert result.exit_code == 0, result.output
    assert "segment: 2 images" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["03.png", "03_cutout.png", "03_mask.png",
                                                     "a.png", "a_cutout.png", "a_mask.png"]  # the stage's naming
    assert np.array_equal(png(out / "03.png")[..., ::-1], load_rgb(CONCEPTS / "dog3" / "03.jpg"))
    mask = png(out / "03_mask.png")
    assert np.array_equal(mask > 0, segment_grabcut(load_rgb(CONCEPTS / "dog3" / "03.jpg")))
    assert np.array_equal(png(out / "03_cutout.png")[..., 3], mask)
    Image.open(files / "a.jpg").save(files / "b.png")
    result = CliRunner().invoke(app, ["segment", str(files / "b.png"), "--out", str(files)])
    assert result.exit_code != 0 and "would overwrite it" in str(result.exception)
    assert np.array_equal(load_rgb(files / "b.png"), load_rgb(files / "a.jpg"))  # the input is untouched


@pytest.mark.slow
def test_dvc_repro_segment_in_a_project_copy(project: Path):
    run([sys.executable, "-m", "dvc", "repro", "segment"], project)
    check_layout(project / "data" / "segmented", 10, base=project)
    again = run([sys.executable, "-m", "dvc", "repro", "segment"], project)
    assert "didn't change, skipping" in again.stdout
