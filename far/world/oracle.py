"""The oracle: reads a world image's truth back from its pixels alone.

It never sees attention maps, prompts or anything from training; it sees an RGB image. Two small networks:
1. `PixelNet` labels every pixel as subject or background (and with its owner's body colour, a help to
   learning), the whole image with its background, and finds instances the way Panoptic-DeepLab does: a
   heatmap of subject centres, and per subject pixel the offset to its own subject's centre. A subject is
   the foreground pixels that point to one centre, so a subject whose colours smear apart is still one
   subject, and two touching subjects of one colour are two.
2. `SubjectNet` reads each subject from a square crop around it plus its mask: class (a question of shape,
   which needs the whole silhouette), body colour, part colour and pattern.
(A single per-pixel network, tried first, read colours but not classes: 28 % class accuracy, chance. The
previous stage 1 took the connected regions of one body colour as subjects: wrong counts, mostly too many
subjects from fragments, were most of its errors.)
Trained on rendered scenes and on their round trips through the world's VAE (what generated images look
like), see far/world/oracle_train.py.

The oracle's measured accuracy is in reports/bench/world.json.
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

# Per pixel: subject or background; the owner's body colour; centre heatmap logit; offset (dy, dx) to the owner's
# centre, as a fraction of the image side.
PIXEL_HEADS = {"fg": 2, "body": len(COLOUR_NAMES), "centre": 1, "offset": 2}
FORMAT = "instances-1"  # written into the weights' header; a file without it is the older, region-based stage 1
CENTRE_THRESHOLD = 0.3  # a centre is a local maximum of the heatmap's probability above this
CENTRE_WINDOW = 0.14  # local maxima are taken over a window this fraction of the image side (9 px at 64 px)
MAX_POINTING_ERROR = 0.1  # a pixel whose offset lands farther than this (image fraction) from every centre is noise
SUBJECT_HEADS = {"cls": len(CLASSES), "body": len(COLOUR_NAMES), "part": len(COLOUR_NAMES), "pattern": len(PATTERNS)}
MIN_AREA = 0.012  # a subject covers at least this fraction of the image (~49 px at 64 px)
CROP = 32  # px side of the square crop (grown 15 % around the subject) the subject head reads
CROP_MARGIN = 0.15


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class PixelNet(nn.Module):
    """Stage 1, a 3-level U-Net on a stride-2 stem: (B, 3, H, W) in [-1, 1] -> per-pixel logits per PIXEL_HEADS
    (B, C, H, W), predicted at H/2 and upsampled bilinearly, and (B, 5) background logits. Only local
    questions (is this pixel a subject, which one): shape and parts are stage 2's."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Conv2d(3, w, 4, stride=2, padding=1)
        self.enc1, self.enc2, self.enc3 = _block(w, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.dec2, self.dec1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.pixel = nn.Conv2d(w, sum(PIXEL_HEADS.values()), 1)
        with torch.no_grad():  # centres start rare (p = 0.01, CenterNet's prior): else the focal negatives swamp it
            heads = list(PIXEL_HEADS)
            self.pixel.bias[sum(PIXEL_HEADS[h] for h in heads[: heads.index("centre")])] = -4.6
        self.background = nn.Linear(4 * w, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        e1 = self.enc1(self.stem(x))  # (B, w, H/2, W/2)
        e2 = self.enc2(F.avg_pool2d(e1, 2))  # (B, 2w, H/4, W/4)
        e3 = self.enc3(F.avg_pool2d(e2, 2))  # (B, 4w, H/8, W/8)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        logits = F.interpolate(self.pixel(d1), size=x.shape[-2:], mode="bilinear", align_corners=False)
        heads = dict(zip(PIXEL_HEADS, torch.split(logits, list(PIXEL_HEADS.values()), dim=1), strict=True))
        return heads, self.background(e3.mean(dim=(2, 3)))


class SubjectNet(nn.Module):
    """Stage 2: one subject's crop and mask (B, 4, CROP, CROP) -> logits per SUBJECT_HEADS (B, C)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(4, w), nn.AvgPool2d(2), _block(w, 2 * w), nn.AvgPool2d(2), _block(2 * w, 4 * w), nn.AvgPool2d(2),
            _block(4 * w, 4 * w),
        )
        self.heads = nn.Linear(4 * w, sum(SUBJECT_HEADS.values()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.heads(self.features(x).mean(dim=(2, 3)))
        return dict(zip(SUBJECT_HEADS, torch.split(logits, list(SUBJECT_HEADS.values()), dim=1), strict=True))


def crop_boxes(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool masks -> (K, 4) float square boxes (x0, y0, x1, y1) grown by CROP_MARGIN around each."""
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        half = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) * (1 + 2 * CROP_MARGIN) / 2
        boxes.append((cx - half, cy - half, cx + half, cy + half))
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def subject_crops(x: torch.Tensor, image_index: np.ndarray, masks: np.ndarray) -> torch.Tensor:
    """Stage-2 inputs: x (B, 3, H, W) in [-1, 1], masks (K, H, W) bool of subjects in images image_index (K,)
    -> (K, 4, CROP, CROP): the image and the subject's mask (as -1/1), bilinearly resampled, zero outside."""
    from torchvision.ops import roi_align

    if not len(masks):
        return torch.zeros(0, 4, CROP, CROP)
    planes = torch.cat([x[torch.as_tensor(image_index)], torch.from_numpy(masks).float().unsqueeze(1) * 2 - 1], 1)
    boxes = torch.cat([torch.arange(len(masks), dtype=torch.float32)[:, None], torch.from_numpy(crop_boxes(masks))], 1)
    return roi_align(planes, boxes, output_size=CROP, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def mirrored_probs(subject: SubjectNet, crops: torch.Tensor) -> dict[str, np.ndarray]:
    """Each head's probabilities (K, classes) for crops (K, 4, CROP, CROP), averaged over the crops and their
    mirror images. World subjects face either way (`Subject.flip`), so the mirror image is as true a view as
    the crop; on 3,000 held-out round-tripped scenes the average read part colour 0.5 points better (README)."""
    seen, mirrored = subject(crops), subject(crops.flip(-1))
    return {k: ((seen[k].softmax(1) + mirrored[k].softmax(1)) / 2).numpy() for k in seen}


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


def centres(centre_logit: torch.Tensor, threshold: float = CENTRE_THRESHOLD) -> list[np.ndarray]:
    """Subject centres from heatmap logits (B, 1, H, W): per image a (K, 2) array of (y, x) pixel positions,
    the local maxima of the probability over a CENTRE_WINDOW window that exceed `threshold`."""
    prob = torch.sigmoid(centre_logit)
    k = int(round(CENTRE_WINDOW * prob.shape[-1])) // 2 * 2 + 1  # odd window
    peak = (prob == F.max_pool2d(prob, k, stride=1, padding=k // 2)) & (prob > threshold)
    return [np.argwhere(p[0].numpy()).astype(np.float32) for p in peak]


def instances(fg: np.ndarray, offset: np.ndarray, centre_yx: np.ndarray,
              min_area: float = MIN_AREA) -> list[np.ndarray]:
    """Subjects' pixels: fg (H, W) bool, offset (2, H, W) (dy, dx) as image fractions, centre_yx (K, 2) pixels ->
    one (H, W) bool mask per centre that gathers at least `min_area` of the image: each foreground pixel
    goes to the centre nearest to where its offset points, unless that is over MAX_POINTING_ERROR away."""
    h, w = fg.shape
    if not len(centre_yx) or not fg.any():
        return []
    ys, xs = np.nonzero(fg)
    pointed = np.stack([ys + offset[0, ys, xs] * h, xs + offset[1, ys, xs] * w], 1)  # (P, 2)
    dist = np.linalg.norm(pointed[:, None, :] - centre_yx[None, :, :], axis=2)  # (P, K)
    owner = dist.argmin(1)
    near = dist[np.arange(len(owner)), owner] <= MAX_POINTING_ERROR * max(h, w)
    found = []
    for k in range(len(centre_yx)):
        mask = np.zeros((h, w), dtype=bool)
        pick = near & (owner == k)
        mask[ys[pick], xs[pick]] = True
        if mask.sum() >= min_area * h * w:
            found.append(mask)
    return found


class Oracle:
    """Loads the shipped oracle weights and reads images: `oracle.read(images) -> [Reading, ...]`."""

    def __init__(self, pixel: PixelNet, subject: SubjectNet, resolution: int, label: str = "world-oracle") -> None:
        self.pixel = pixel.eval()
        self.subject = subject.eval()
        self.resolution = resolution
        self.label = label

    @staticmethod
    def load(path: Path | str) -> Oracle:
        from safetensors.torch import load_file

        from far.errors import InvalidInputError
        from far.io import file_sha256

        path = Path(path)
        meta = _metadata(path)
        if meta.get("format") != FORMAT:
            found = meta.get("format", "none (an older oracle, which grouped subjects by colour)")
            raise InvalidInputError(f"{path}: oracle weights of format {found}, this far reads {FORMAT}; "
                                    "remake them with `far world oracle`")
        state = {k: v.float() for k, v in load_file(path).items()}
        pixel, subject = PixelNet(int(meta["width"])), SubjectNet(int(meta["subject_width"]))
        pixel.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("pixel.")})
        subject.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("subject.")})
        return Oracle(pixel, subject, int(meta["resolution"]), label=f"world-oracle@{file_sha256(path)[:12]}")

    def widths(self) -> dict[str, int]:
        """The architecture's widths, as `save` writes them and `load` reads them back."""
        return {"width": self.pixel.stem.out_channels, "subject_width": self.subject.features[0][0].out_channels}

    def save(self, path: Path | str, **metadata: str) -> None:
        """fp16 safetensors; the architecture (widths, resolution) and `metadata` in its header."""
        from safetensors.torch import save_file

        from far.io import atomic_file

        tensors = {f"pixel.{k}": v for k, v in self.pixel.state_dict().items()}
        tensors |= {f"subject.{k}": v for k, v in self.subject.state_dict().items()}
        widths = self.widths()
        meta = {k: str(v) for k, v in (widths | {"resolution": self.resolution, "format": FORMAT} | metadata).items()}
        with atomic_file(path) as tmp:
            save_file({k: v.detach().half().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)

    @torch.no_grad()
    def read(self, images: np.ndarray | list, batch_size: int = 64) -> list[Reading]:
        """Readings of (B, H, W, 3) uint8 images (or a list of PIL images / arrays); masks at input size."""
        arrays = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in images]
        out: list[Reading] = []
        for i in range(0, len(arrays), batch_size):
            chunk = np.stack(arrays[i : i + batch_size])
            x = to_input(chunk, self.resolution)
            pixel, bg = self.pixel(x)
            fg = pixel["fg"].argmax(1).numpy().astype(bool)
            offset = pixel["offset"].numpy()
            found = [instances(fg[j], offset[j], c) for j, c in enumerate(centres(pixel["centre"]))]
            index = np.array([j for j, rs in enumerate(found) for _ in rs], dtype=np.int64)
            masks = np.array([r for rs in found for r in rs]).reshape(-1, *fg.shape[1:])
            probs = mirrored_probs(self.subject, subject_crops(x, index, masks)) if len(masks) else {}
            k = 0
            for j, rs in enumerate(found):
                subjects = []
                for r in rs:
                    p = {h: v[k] for h, v in probs.items()}
                    k += 1
                    subjects.append(SubjectReading(
                        CLASSES[int(p["cls"].argmax())], COLOUR_NAMES[int(p["body"].argmax())],
                        COLOUR_NAMES[int(p["part"].argmax())], PATTERNS[int(p["pattern"].argmax())], r,
                        float(np.mean([v.max() for v in p.values()])),
                    ))
                subjects.sort(key=lambda s: s.bbox[0])  # left to right, like captions
                reading = Reading(BACKGROUNDS[int(bg[j].argmax())], tuple(subjects))
                if chunk.shape[1:3] != (self.resolution, self.resolution):
                    reading = _resize_masks(reading, chunk.shape[1:3])
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
