"""A procedural renderer of world scenes: 1-3 subjects on a named background, with exact masks.

A `Scene` is pure ground truth (classes, colours, patterns, placement, background and a texture seed);
`render` turns it into pixels and one visible-pixel mask per subject. Subjects are drawn back to front
(larger `cy` is nearer the viewer), so each mask is what is left visible under occlusion. Everything is
deterministic from the scene; `sample_scene` draws scenes deterministically from a numpy Generator.

Subjects are drawn in their own coordinates (u, v), about [-0.6, 0.6] x [-0.6, 0.6], scaled by `size`
(fraction of the image side per unit) and mirrored by `flip`. The image is rendered at 2x and averaged
down, so edges are anti-aliased; each mask pixel goes to the subject (or background) covering most of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from far.world.vocab import BACKGROUNDS, CLASSES, COLOUR_NAMES, COLOURS, MAX_SUBJECTS, PATTERNS

SUPERSAMPLE = 2


@dataclass(frozen=True)
class Subject:
    """One subject's ground truth. `cx`, `cy`: centre as a fraction of the image; `size`: image fraction per unit."""

    cls: str
    body: str
    part: str
    pattern: str = "plain"
    cx: float = 0.5
    cy: float = 0.6
    size: float = 0.5
    flip: bool = False

    def __post_init__(self) -> None:
        for key, value, known in (
            ("cls", self.cls, CLASSES), ("body", self.body, COLOUR_NAMES),
            ("part", self.part, COLOUR_NAMES), ("pattern", self.pattern, PATTERNS),
        ):
            if value not in known:
                raise ValueError(f"subject {key}: {value!r} is not one of {list(known)}")
        if self.body == self.part:
            raise ValueError(f"subject body and part colour are both {self.body!r}; they must differ")

    @property
    def attributes(self) -> tuple[str, str, str]:
        """What makes two subjects of one class different: (body, part, pattern)."""
        return (self.body, self.part, self.pattern)


@dataclass(frozen=True)
class Scene:
    background: str
    subjects: tuple[Subject, ...] = field(default_factory=tuple)
    texture_seed: int = 0

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"scene background: {self.background!r} is not one of {list(BACKGROUNDS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Scene:
        return Scene(d["background"], tuple(Subject(**s) for s in d["subjects"]), int(d.get("texture_seed", 0)))


# ------------------------------------------------------------------------------------------- shapes
def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _rect(u: np.ndarray, v: np.ndarray, u0: float, v0: float, u1: float, v1: float) -> np.ndarray:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _triangle(u: np.ndarray, v: np.ndarray, a: tuple, b: tuple, c: tuple) -> np.ndarray:
    def side(p, q):
        return (u - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (v - q[1])

    d1, d2, d3 = side(a, b), side(b, c), side(c, a)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


def _silhouette(cls: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(body, part) boolean masks of one subject in its own coordinates; the part is drawn over the body."""
    if cls == "dog":  # standing, wide: body, head and snout to the right, floppy ears, four legs, a tail
        body = _ellipse(u, v, -0.05, 0.0, 0.42, 0.2) | _ellipse(u, v, 0.38, -0.22, 0.17, 0.16)
        body |= _ellipse(u, v, 0.55, -0.17, 0.12, 0.08)
        for x in (-0.34, -0.2, 0.12, 0.26):
            body |= _rect(u, v, x - 0.045, 0.05, x + 0.045, 0.45)
        body |= _ellipse(u, v, -0.5, -0.15, 0.06, 0.16)
        part = _ellipse(u, v, 0.28, -0.15, 0.07, 0.16)
    elif cls == "cat":  # sitting, tall: round head on top, pointed ears, tail curled on the side
        body = _ellipse(u, v, 0.0, 0.15, 0.27, 0.33) | _ellipse(u, v, 0.0, -0.3, 0.19, 0.17)
        body |= _ellipse(u, v, 0.33, 0.3, 0.07, 0.2)
        part = _triangle(u, v, (-0.19, -0.36), (-0.03, -0.42), (-0.15, -0.62))
        part |= _triangle(u, v, (0.19, -0.36), (0.03, -0.42), (0.15, -0.62))
    elif cls == "car":  # long body, cabin with a window, two wheels
        body = _rect(u, v, -0.58, -0.05, 0.58, 0.22) | _rect(u, v, -0.3, -0.32, 0.28, -0.05)
        part = _ellipse(u, v, -0.32, 0.24, 0.15, 0.15) | _ellipse(u, v, 0.32, 0.24, 0.15, 0.15)
    elif cls == "cup":  # tall body, round handle on the right
        body = _rect(u, v, -0.28, -0.38, 0.28, 0.4) | _ellipse(u, v, 0.0, 0.4, 0.28, 0.05)
        ring = _ellipse(u, v, 0.3, 0.0, 0.2, 0.2) & ~_ellipse(u, v, 0.3, 0.0, 0.1, 0.1)
        part = ring & (u > 0.26)
    else:
        raise ValueError(f"unknown class {cls!r}")
    return body | part, part


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern colour goes, in subject coordinates (so it scales with the subject)."""
    if pattern == "plain":
        return np.zeros_like(u, dtype=bool)
    if pattern == "spots":
        gu, gv = (u + 1.0) / 0.22, (v + 1.0) / 0.22
        du, dv = gu - np.floor(gu) - 0.5, gv - np.floor(gv) - 0.5
        return du**2 + dv**2 <= 0.27**2
    if pattern == "stripes":
        return np.mod((u + 1.0) / 0.18, 1.0) < 0.45
    raise ValueError(f"unknown pattern {pattern!r}")


# -------------------------------------------------------------------------------------- backgrounds
def _noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1] at n x n: random values on a cells x cells grid, bilinearly upsampled."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1))
    x = np.linspace(0, cells, n, endpoint=False)
    i, f = x.astype(int), x - x.astype(int)
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _vertical(n: int, top: tuple, bottom: tuple, y0: float = 0.0, y1: float = 1.0) -> np.ndarray:
    t = np.clip((np.linspace(0, 1, n) - y0) / max(y1 - y0, 1e-6), 0, 1)[:, None, None]
    return np.broadcast_to(np.array(top) * (1 - t) + np.array(bottom) * t, (n, n, 3)).copy()


def render_background(kind: str, n: int, seed: int) -> np.ndarray:
    """(n, n, 3) float RGB in [0, 255]."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, n)[:, None]
    horizon = 0.38 + rng.uniform(-0.06, 0.06)
    ground = (y >= horizon)[..., None]
    if kind == "grass":
        img = np.where(ground, _vertical(n, (95, 175, 70), (60, 135, 45), horizon, 1),
                       _vertical(n, (150, 195, 240), (195, 225, 245)))
        img += (ground * _noise(rng, n, 16)[..., None] * 18)
    elif kind == "beach":
        sea = (y >= horizon) & (y < horizon + 0.14)
        img = np.where(ground, _vertical(n, (235, 210, 160), (215, 185, 130), horizon, 1),
                       _vertical(n, (140, 195, 240), (185, 220, 245)))
        img = np.where(sea[..., None], np.array((40, 125, 185)), img)
        img += _noise(rng, n, 12)[..., None] * 8
    elif kind == "snow":
        img = np.where(ground, _vertical(n, (245, 247, 252), (222, 230, 242), horizon, 1),
                       _vertical(n, (185, 190, 205), (215, 218, 228)))
        img += _noise(rng, n, 8)[..., None] * 6
    elif kind == "room":
        floor = (y >= horizon + 0.2)[..., None]
        img = np.where(floor, _vertical(n, (150, 100, 60), (120, 78, 45), horizon + 0.2, 1),
                       np.array((210, 190, 160), dtype=float) + _noise(rng, n, 6)[..., None] * 6)
        planks = (np.mod(np.arange(n) / (n / 6.0) + rng.uniform(0, 1), 1.0) < 0.06)[None, :, None]
        img = np.where(floor & planks, img * 0.8, img)
    elif kind == "night":
        img = np.where(ground, _vertical(n, (30, 45, 40), (18, 28, 25), horizon, 1),
                       _vertical(n, (12, 16, 50), (35, 40, 85)))
        stars = (rng.uniform(0, 1, (n, n)) > 0.985) & ~ground[..., 0]
        img[stars] = (235, 235, 210)
        cx, cy, r = rng.uniform(0.15, 0.85) * n, rng.uniform(0.08, 0.2) * n, 0.06 * n
        yy, xx = np.mgrid[0:n, 0:n]
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (245, 240, 200)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return img


# ------------------------------------------------------------------------------------------ render
def _draw(scene: Scene, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scene at SUPERSAMPLE x `resolution`: image (n, n, 3) float, owner (n, n) int16 (0 background,
    i + 1 subject i, visible) and accent (n, n) bool (drawn in a subject's part colour: its part and pattern)."""
    n = resolution * SUPERSAMPLE
    img = render_background(scene.background, n, scene.texture_seed)
    owner = np.zeros((n, n), dtype=np.int16)
    accent = np.zeros((n, n), dtype=bool)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
    for i in sorted(range(len(scene.subjects)), key=lambda j: scene.subjects[j].cy):  # back to front
        s = scene.subjects[i]
        u, v = (xx - s.cx) / s.size, (yy - s.cy) / s.size
        if s.flip:
            u = -u
        body, part = _silhouette(s.cls, u, v)
        drawn_accent = part | (body & _pattern(s.pattern, u, v))
        img[body] = COLOURS[s.body]
        img[drawn_accent] = COLOURS[s.part]
        owner[body] = i + 1
        accent[body] = drawn_accent[body]
    return img, owner, accent


def _downsample(a: np.ndarray, resolution: int) -> np.ndarray:
    """(n, n, ...) at SUPERSAMPLE x -> (resolution, resolution, ...) means."""
    return a.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, *a.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and masks of one scene.

    Returns (image, masks): image (H, W, 3) uint8; masks (N, H, W) bool, one per subject in the scene's
    order, each the subject's visible pixels after the subjects in front of it are drawn.
    """
    img, owner, _ = _draw(scene, resolution)
    image = np.clip(np.rint(_downsample(img, resolution)), 0, 255).astype(np.uint8)
    # Each pixel goes to whoever owns most of its sub-pixels, background included, so masks never overlap;
    # a tie goes to the nearer subject (a lone subject keeps every pixel it covers at least half of).
    k = len(scene.subjects)
    counts = (owner[None] == np.arange(k + 1, dtype=np.int16)[:, None, None])  # (1 + N, n, n): bg, subjects
    counts = counts.reshape(k + 1, resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).sum(axis=(2, 4))
    depth = np.zeros(k + 1, dtype=np.int64)  # 0 background, then 1..N back to front
    depth[1 + np.array(sorted(range(k), key=lambda j: scene.subjects[j].cy), dtype=np.int64)] = np.arange(1, k + 1)
    winner = (counts * (k + 1) + depth[:, None, None]).argmax(axis=0)  # (H, W)
    return image, winner[None] == np.arange(1, k + 1)[:, None, None]


def coverage(scene: Scene, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(subject, accent): (H, W) float in [0, 1], the fraction of each pixel covered by any visible subject,
    and by visible part-colour pixels (parts and pattern), the small regions a VAE most easily blurs away."""
    _, owner, accent = _draw(scene, resolution)
    return _downsample((owner > 0).astype(np.float32), resolution), _downsample(accent.astype(np.float32), resolution)


# ------------------------------------------------------------------------------------------ sample
# Where subjects stand, by count: centre x slots (jittered), the vertical band, and the size range.
_SLOTS = {1: (0.5,), 2: (0.29, 0.71), 3: (0.2, 0.5, 0.8)}
_SIZES = {1: (0.55, 0.7), 2: (0.38, 0.46), 3: (0.26, 0.32)}


def sample_subject(rng: np.random.Generator, cls: str | None = None) -> Subject:
    """A subject with uniformly random class (unless given), body and part colours (distinct) and pattern."""
    cls = cls or CLASSES[rng.integers(len(CLASSES))]
    body, part = rng.choice(len(COLOUR_NAMES), size=2, replace=False)
    return Subject(cls, COLOUR_NAMES[body], COLOUR_NAMES[part], PATTERNS[rng.integers(len(PATTERNS))])


def place(subjects: list[Subject], rng: np.random.Generator) -> tuple[Subject, ...]:
    """Put subjects (left to right in the given order) into the slots for their count, with jitter."""
    k = len(subjects)
    if not 1 <= k <= MAX_SUBJECTS:
        raise ValueError(f"a scene holds 1..{MAX_SUBJECTS} subjects, got {k}")
    lo, hi = _SIZES[k]
    placed = []
    for s, cx in zip(subjects, _SLOTS[k], strict=True):
        placed.append(Subject(
            s.cls, s.body, s.part, s.pattern,
            cx=float(cx + rng.uniform(-0.06, 0.06) / k),
            cy=float(rng.uniform(0.56, 0.64) if k == 1 else rng.uniform(0.6, 0.7)),
            size=float(rng.uniform(lo, hi)), flip=bool(rng.integers(2)),
        ))
    return tuple(placed)


def sample_scene(rng: np.random.Generator, n_subjects: int | None = None, background: str | None = None) -> Scene:
    """A random scene: 1-3 subjects (uniform unless given) on a random background (unless given)."""
    k = n_subjects or int(rng.integers(1, MAX_SUBJECTS + 1))
    subjects = [sample_subject(rng) for _ in range(k)]
    bg = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return Scene(bg, place(subjects, rng), texture_seed=int(rng.integers(2**31)))
