"""World concepts: specific world subjects photographed a few times, written as ordinary concept folders.

Two dogs of one class that differ in every attribute (body colour, part colour, pattern), each shown alone
and always on one or two backgrounds: the situation of two real dogs photographed at home, where a model can
leak one dog's attributes into the other and memorise the backgrounds it saw. Because the truth is known, the
evaluate stage can tell exactly which happened (far/world/verdict.py).

A concept folder (`data/concepts/world_dog_a/`) holds `00.png ... 04.png` (64 px renders, far/world/render.py),
their exact masks `00_mask.png ...` ({0, 255}, for `segment.backend: provided`) and `world.json`, the dog's
ground truth: class, body, part, pattern, the reference backgrounds, the seed and every reference scene. Every
stage reads the folder as any other concept; sample (world prompts) and evaluate (the world verdict) read
`world.json` from the folder itself, so a concept's truth travels with its images.

The folders are rendered by `far world concepts` and committed (a few kB); rendering is deterministic
(tests/test_world_concepts.py re-renders them byte for byte).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from far.errors import InvalidInputError
from far.io import atomic_dir
from far.world.render import Scene, Subject, place, render

TRUTH_FILE = "world.json"
RESOLUTION = 64
REFERENCES = 5  # reference scenes per dog


@dataclass(frozen=True)
class WorldDog:
    """One world concept's ground truth: what it looks like and where it was photographed."""

    name: str  # the concept folder's name (and `concepts.subjects[*].name`)
    cls: str
    body: str
    part: str
    pattern: str
    backgrounds: tuple[str, ...]  # the only backgrounds of its reference scenes
    seed: int  # placement and texture of its reference scenes

    def __post_init__(self) -> None:
        Subject(self.cls, self.body, self.part, self.pattern)  # validates the attributes against the vocabulary
        for bg in self.backgrounds:
            Scene(bg)  # validates the background name
        if not self.backgrounds:
            raise ValueError(f"world concept {self.name}: needs at least one reference background")

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.body, self.part, self.pattern)

    def to_dict(self) -> dict:
        return {"name": self.name, "class": self.cls, "body": self.body, "part": self.part, "pattern": self.pattern,
                "backgrounds": list(self.backgrounds), "seed": self.seed}

    @staticmethod
    def from_dict(d: dict) -> WorldDog:
        return WorldDog(d["name"], d["class"], d["body"], d["part"], d["pattern"], tuple(d["backgrounds"]),
                        int(d["seed"]))


# The default pair (params.yaml) and a second pair nobody tuned on (configs/world-pair2.yaml, issue 13).
PAIRS: dict[str, tuple[WorldDog, WorldDog]] = {
    "default": (
        WorldDog("world_dog_a", "dog", "red", "blue", "spots", ("grass",), seed=101),
        WorldDog("world_dog_b", "dog", "yellow", "purple", "stripes", ("room", "snow"), seed=202),
    ),
    "pair2": (
        WorldDog("world_pair2_a", "dog", "orange", "pink", "plain", ("beach",), seed=303),
        WorldDog("world_pair2_b", "dog", "blue", "yellow", "spots", ("night", "grass"), seed=404),
    ),
}


def reference_scenes(dog: WorldDog, n: int = REFERENCES) -> list[Scene]:
    """The dog alone, on its backgrounds in turn; placement and texture drawn from (seed, i)."""
    scenes = []
    for i in range(n):
        rng = np.random.default_rng([dog.seed, i])
        subject = Subject(dog.cls, dog.body, dog.part, dog.pattern)
        scenes.append(Scene(dog.backgrounds[i % len(dog.backgrounds)], place([subject], rng),
                            texture_seed=int(rng.integers(2**31))))
    return scenes


def write_concept(dog: WorldDog, root: Path, n: int = REFERENCES, resolution: int = RESOLUTION) -> Path:
    """Render `root/<name>/` (images, {0,255} masks, world.json), replacing it atomically; returns the folder."""
    scenes = reference_scenes(dog, n)
    folder = Path(root) / dog.name
    with atomic_dir(folder) as tmp:
        for i, scene in enumerate(scenes):
            image, masks = render(scene, resolution)
            Image.fromarray(image).save(tmp / f"{i:02d}.png")
            Image.fromarray(masks[0].astype(np.uint8) * 255).save(tmp / f"{i:02d}_mask.png")
        truth = dog.to_dict() | {"resolution": resolution, "scenes": [s.to_dict() for s in scenes]}
        (tmp / TRUTH_FILE).write_text(json.dumps(truth, indent=2) + "\n")
    return folder


def read_truth(folder: Path) -> WorldDog | None:
    """The ground truth in `folder/world.json`, or None when the folder is not a world concept."""
    path = Path(folder) / TRUTH_FILE
    if not path.is_file():
        return None
    try:
        return WorldDog.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path}: not a valid world concept truth ({exc}); re-render it with "
                                "`far world concepts`") from None


def world_truths(subjects: Sequence, required: bool = False) -> dict[str, WorldDog]:
    """{concept name: truth} of `concepts.subjects` (ConceptSpec-like: name, images) when they are world concepts.

    Returns {} when none of the folders has a world.json (and `required` is false). A mix (some with, some
    without), or `required` with none, raises InvalidInputError naming the folders that lack one.
    """
    truths = {c.name: read_truth(c.images) for c in subjects}
    missing = [str(Path(c.images) / TRUTH_FILE) for c in subjects if truths[c.name] is None]
    if missing and (required or len(missing) < len(truths)):
        raise InvalidInputError(f"concepts: {missing} missing: every concept must be a world concept here "
                                "(render them with `far world concepts`) or none")
    return {} if missing else {n: t for n, t in truths.items() if t is not None}
