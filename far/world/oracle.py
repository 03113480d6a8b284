"""The oracle: reads a world image's truth back from its pixels alone.

It never sees attention maps, prompts or anything from training; it sees an RGB image. A small fully
convolutional network labels every pixel with the class of the subject it belongs to (or background) and
that subject's body colour, part colour and pattern, and the whole image with its background. Subjects are
then the connected regions of one (class, body colour) label; each subject's attributes are the mean of its
pixels' probabilities. Trained on rendered scenes and on their round trips through the world's VAE (what
generated images look like), see `train_oracle`.

Two subjects of the same class and body colour that touch read as one subject (the renderer keeps subjects
mostly apart, see far/world/render.py); the oracle's measured accuracy is in reports/bench/world.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from far.world.vocab import BACKGROUNDS, CLASSES, COLOUR_NAMES, PATTERNS

HEADS = {  # per-pixel heads (class 0 is background) and the image-level background head
    "cls": 1 + len(CLASSES),
    "body": len(COLOUR_NAMES),
    "part": len(COLOUR_NAMES),
    "pattern": len(PATTERNS),
}
MIN_AREA = 0.012  # a subject covers at least this fraction of the image (~49 px at 64 px)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class OracleNet(nn.Module):
    """A 3-level U-Net on a stride-2 stem: (B, 3, H, W) in [-1, 1] -> per-pixel logits per head (B, C, H, W),
    predicted at H/2 and upsampled bilinearly (4x cheaper than full resolution; subjects span >= 7 px), and
    (B, 5) background logits."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Conv2d(3, w, 4, stride=2, padding=1)
        self.enc1, self.enc2, self.enc3 = _block(w, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.dec2, self.dec1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.pixel = nn.Conv2d(w, sum(HEADS.values()), 1)
        self.background = nn.Linear(4 * w, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        e1 = self.enc1(self.stem(x))  # (B, w, H/2, W/2)
        e2 = self.enc2(F.avg_pool2d(e1, 2))  # (B, 2w, H/4, W/4)
        e3 = self.enc3(F.avg_pool2d(e2, 2))  # (B, 4w, H/8, W/8)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        logits = F.interpolate(self.pixel(d1), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return dict(zip(HEADS, torch.split(logits, list(HEADS.values()), dim=1), strict=True)), \
            self.background(e3.mean(dim=(2, 3)))


@dataclass(frozen=True)
class SubjectReading:
    """One subject the oracle found: its labels, confidence (mean max-probability) and visible pixels."""

    cls: str
    body: str
    part: str
    pattern: str
    mask: np.ndarray  # (H, W) bool at the image's resolution
    confidence: float

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.body, self.part, self.pattern)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    def to_dict(self) -> dict:
        return {"cls": self.cls, "body": self.body, "part": self.part, "pattern": self.pattern,
                "bbox": list(self.bbox), "confidence": round(self.confidence, 4)}


@dataclass(frozen=True)
class Reading:
    background: str
    subjects: tuple[SubjectReading, ...]


def to_input(images: np.ndarray, resolution: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, r, r) float in [-1, 1], resized (bilinear) when H != r."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x


def _components(mask: np.ndarray) -> list[np.ndarray]:
    import cv2

    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    return [labels == i for i in range(1, n)]


def decode(pixel: dict[str, np.ndarray], background: np.ndarray, min_area: float = MIN_AREA) -> Reading:
    """One image's reading from its probabilities: pixel[head] (C, H, W), background (5,)."""
    cls_map = pixel["cls"].argmax(0)
    body_map = pixel["body"].argmax(0)
    h, w = cls_map.shape
    found = []
    for c in range(1, HEADS["cls"]):
        for b in range(HEADS["body"]):
            for region in _components((cls_map == c) & (body_map == b)):
                if region.sum() < min_area * h * w:
                    continue
                probs = {k: v[:, region].mean(axis=1) for k, v in pixel.items()}
                conf = float(np.mean([probs["cls"][c], probs["body"][b], probs["part"].max(), probs["pattern"].max()]))
                found.append(SubjectReading(
                    CLASSES[c - 1], COLOUR_NAMES[b], COLOUR_NAMES[int(probs["part"].argmax())],
                    PATTERNS[int(probs["pattern"].argmax())], region, conf,
                ))
    found.sort(key=lambda s: s.bbox[0])  # left to right, like captions
    return Reading(BACKGROUNDS[int(background.argmax())], tuple(found))


class Oracle:
    """Loads the shipped oracle weights and reads images: `oracle.read(images) -> [Reading, ...]`."""

    def __init__(self, net: OracleNet, resolution: int, label: str = "world-oracle") -> None:
        self.net = net.eval()
        self.resolution = resolution
        self.label = label

    @staticmethod
    def load(path: Path | str) -> Oracle:
        from safetensors.torch import load_file

        path = Path(path)
        state = load_file(path)
        meta = _metadata(path)
        net = OracleNet(int(meta["width"]))
        net.load_state_dict({k: v.float() for k, v in state.items()})
        return Oracle(net, int(meta["resolution"]), label=f"world-oracle@{meta.get('sha256', '')[:12]}")

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        pixel, bg = self.net(to_input(images, self.resolution))
        return {k: v.softmax(1).numpy() for k, v in pixel.items()}, bg.softmax(1).numpy()

    def read(self, images: np.ndarray | list, batch_size: int = 64) -> list[Reading]:
        """Readings of (B, H, W, 3) uint8 images (or a list of PIL images / arrays); masks at input size."""
        arrays = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in images]
        out: list[Reading] = []
        for i in range(0, len(arrays), batch_size):
            chunk = arrays[i : i + batch_size]
            size = chunk[0].shape[:2]
            pixel, bg = self.probabilities(np.stack(chunk))
            for j in range(len(chunk)):
                reading = decode({k: v[j] for k, v in pixel.items()}, bg[j])
                if size != (self.resolution, self.resolution):
                    reading = _resize_masks(reading, size)
                out.append(reading)
        return out


def _resize_masks(reading: Reading, size: tuple[int, int]) -> Reading:
    subjects = tuple(
        SubjectReading(s.cls, s.body, s.part, s.pattern,
                       np.asarray(Image.fromarray(s.mask).resize((size[1], size[0]), Image.NEAREST)), s.confidence)
        for s in reading.subjects
    )
    return Reading(reading.background, subjects)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
