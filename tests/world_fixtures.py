"""World test helpers: an oracle that reads renders exactly, and scenes of given subjects."""

from __future__ import annotations

import numpy as np

from far.world.oracle import Oracle, PixelNet, Reading, SubjectNet, SubjectReading
from far.world.render import Scene, Subject, place, render


class TruthOracle(Oracle):
    """An oracle that reads known renders exactly: each subject's visible mask and attributes from the scene."""

    def __init__(self, scenes: list[Scene]):
        super().__init__(PixelNet(8), SubjectNet(8), 64, label="truth-oracle")
        self.truth = {render(s)[0].tobytes(): s for s in scenes}

    def read(self, images, batch_size: int = 64) -> list[Reading]:  # noqa: ANN001 - arrays or PIL images
        out = []
        for image in images:
            scene = self.truth[np.asarray(image.convert("RGB") if hasattr(image, "convert") else image).tobytes()]
            masks = render(scene)[1]
            subjects = [SubjectReading(s.cls, s.body, s.part, s.pattern, m, 1.0)
                        for s, m in zip(scene.subjects, masks, strict=True)]
            out.append(Reading(scene.background, tuple(sorted(subjects, key=lambda r: r.bbox[0]))))
        return out


def scene(background: str, *dogs: Subject, seed: int = 0) -> Scene:
    return Scene(background, place(list(dogs), np.random.default_rng(seed)), texture_seed=seed)


def as_subject(d) -> Subject:  # noqa: ANN001 - a WorldDog
    return Subject(d.cls, *d.attributes)


def random_oracle(path, seed: int = 0):  # noqa: ANN001, ANN201 - a Path; returns it
    """A randomly initialised oracle saved as the shipped one is (Oracle.save): until the real weights exist."""
    import torch

    torch.manual_seed(seed)
    Oracle(PixelNet(8), SubjectNet(8), 64).save(path, seed=str(seed))
    return path
