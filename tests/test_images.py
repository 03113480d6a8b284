"""far/images.py: every odd-but-valid image file becomes 8-bit RGB; every bad one is a clear error naming it.

Each case writes a real file of that kind with PIL/OpenCV (CMYK JPEG, I;16 PNG, palette PNG, truncated JPEG,
EXIF-rotated JPEG, ...) and loads it back through `load_rgb` / `load_folder`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from far.errors import InvalidInputError
from far.images import BadImageError, list_images, load_folder, load_rgb, pixel_digest

ROOT = Path(__file__).resolve().parents[1]
DOG = ROOT / "data" / "concepts" / "dog"


def halves(w: int = 120, h: int = 80) -> np.ndarray:
    """(h, w, 3) uint8: left half red, right half blue."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (255, 0, 0)
    rgb[:, w // 2:] = (0, 0, 255)
    return rgb


def test_real_reference_photo_loads_as_uint8_rgb():
    rgb = load_rgb(DOG / "00.jpg")
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert min(rgb.shape[:2]) == 256  # the shipped copies are 256 px on the short side
    with Image.open(DOG / "00.jpg") as im:
        assert np.array_equal(rgb, np.asarray(im.convert("RGB")))  # a plain RGB JPEG is passed through untouched


def test_exif_orientation_is_applied(tmp_path: Path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(halves()).save(path, quality=95, exif=exif)
    rgb = load_rgb(path)
    assert rgb.shape == (120, 80, 3)  # width and height swapped
    top, bottom = rgb[10, 40].astype(int), rgb[-10, 40].astype(int)
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_grayscale_becomes_three_equal_channels(tmp_path: Path):
    gray = np.tile(np.arange(100, dtype=np.uint8), (80, 1))
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    rgb = load_rgb(tmp_path / "g.png")
    assert rgb.shape == (80, 100, 3)
    assert all(np.array_equal(rgb[..., c], gray) for c in range(3))


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path):
    im = Image.new("P", (100, 100), 0)
    im.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 0 black (transparent), index 1 green
    im.paste(1, (25, 25, 75, 75))
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    rgb = load_rgb(tmp_path / "p.png")
    assert tuple(rgb[5, 5]) == (255, 255, 255)  # transparent -> white, not the stored black
    assert tuple(rgb[50, 50]) == (0, 200, 0)


def test_rgba_is_composited_on_white(tmp_path: Path):
    rgba = np.zeros((90, 90, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[30:60, 30:60, 3] = 255
    rgba[0:10, 0:10, 3] = 128  # half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = load_rgb(tmp_path / "a.png")
    assert tuple(rgb[45, 45]) == (10, 20, 30)
    assert tuple(rgb[80, 80]) == (255, 255, 255)
    assert np.allclose(rgb[5, 5], [132, 137, 142], atol=2)  # 50 % over white


def test_cmyk_jpeg_is_converted(tmp_path: Path):
    cmyk = Image.new("CMYK", (100, 100), (255, 0, 0, 0))  # pure cyan
    cmyk.save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"  # the file really is CMYK
    rgb = load_rgb(tmp_path / "c.jpg").astype(int)
    assert rgb[50, 50, 0] < 40 and rgb[50, 50, 1] > 215 and rgb[50, 50, 2] > 215


def test_16bit_grayscale_png_is_scaled_not_truncated(tmp_path: Path):
    values = np.array([0, 257 * 64, 257 * 128, 65535], np.uint16)
    arr = np.repeat(np.repeat(values[None, :], 80, 0), 25, 1)  # (80, 100)
    Image.fromarray(arr).save(tmp_path / "i16.png")  # uint16 -> mode I;16
    with Image.open(tmp_path / "i16.png") as im:
        assert im.mode.startswith("I")
    rgb = load_rgb(tmp_path / "i16.png")
    assert list(rgb[40, [0, 30, 60, 99], 0]) == [0, 64, 128, 255]


def test_16bit_rgb_png_is_scaled(tmp_path: Path):
    bgr16 = np.zeros((80, 100, 3), np.uint16)
    bgr16[..., 2] = 65535  # red in OpenCV's BGR order
    bgr16[..., 1] = 257 * 100
    assert cv2.imwrite(str(tmp_path / "rgb16.png"), bgr16)
    rgb = load_rgb(tmp_path / "rgb16.png")
    assert rgb.dtype == np.uint8 and tuple(rgb[0, 0]) == (255, 100, 0)


def test_truncated_jpeg_is_rejected_naming_the_file(tmp_path: Path):
    data = (DOG / "01.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match=r"cut\.jpg: corrupt or truncated"):
        load_rgb(path)


def test_non_image_file_is_rejected_naming_the_file(tmp_path: Path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture\n")
    with pytest.raises(BadImageError, match=r"notes\.jpg: not an image file"):
        load_rgb(path)


def test_tiny_image_is_rejected(tmp_path: Path):
    Image.fromarray(halves(w=200, h=50)).save(tmp_path / "tiny.png")
    with pytest.raises(BadImageError, match=r"tiny\.png: image is 200x50 px; the shorter side must be at least 64"):
        load_rgb(tmp_path / "tiny.png")


def test_empty_concept_folder_is_an_error_naming_it(tmp_path: Path):
    empty = tmp_path / "cat"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")  # hidden files do not count
    with pytest.raises(InvalidInputError, match=r"cat: concept image folder is empty"):
        list_images(empty)
    with pytest.raises(InvalidInputError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_duplicates_error_or_skip_with_warning(tmp_path: Path, caplog):
    folder = tmp_path / "dog"
    folder.mkdir()
    shutil.copy(DOG / "00.jpg", folder / "a.jpg")
    shutil.copy(DOG / "01.jpg", folder / "b.jpg")
    Image.open(DOG / "00.jpg").save(folder / "c.png")  # same pixels, different file and format
    with pytest.raises(BadImageError, match=r"c\.png: duplicate of .*a\.jpg"):
        load_folder(folder)
    with caplog.at_level(logging.WARNING):
        loaded = load_folder(folder, on_bad_image="skip")
    assert [i.path.name for i in loaded] == ["a.jpg", "b.jpg"]
    assert "c.png: duplicate of" in caplog.text
    assert loaded[0].digest == pixel_digest(load_rgb(DOG / "00.jpg"))


def test_skip_mode_skips_bad_files_but_not_an_all_bad_folder(tmp_path: Path, caplog):
    folder = tmp_path / "dog"
    folder.mkdir()
    shutil.copy(DOG / "02.jpg", folder / "good.jpg")
    (folder / "broken.jpg").write_bytes((DOG / "03.jpg").read_bytes()[:3000])
    (folder / "README.txt").write_text("photos of my dog")
    with pytest.raises(BadImageError, match="README.txt"):
        load_folder(folder)
    with caplog.at_level(logging.WARNING):
        loaded = load_folder(folder, on_bad_image="skip")
    assert [i.path.name for i in loaded] == ["good.jpg"]
    assert "broken.jpg" in caplog.text and "README.txt" in caplog.text
    (folder / "good.jpg").unlink()
    with pytest.raises(InvalidInputError, match="no usable reference image left"):
        load_folder(folder, on_bad_image="skip")


def test_excluded_suffix_files_are_not_candidates(tmp_path: Path):
    shutil.copy(DOG / "00.jpg", tmp_path / "00.jpg")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(tmp_path / "00_mask.png")
    assert [p.name for p in list_images(tmp_path, exclude_suffix="_mask.png")] == ["00.jpg"]
    assert len(list_images(tmp_path)) == 2
