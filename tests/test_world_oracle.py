"""far/world/oracle.py: the instance grouping on exact targets, the weights' format, and the shipped oracle on
known renders."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from far.errors import InvalidInputError
from far.world import paths
from far.world.oracle import MIN_AREA, Oracle, PixelNet, Reading, SubjectNet, centres, instances, mirrored_probs
from far.world.oracle_train import accuracy, centre_loss, instance_targets, render_set
from far.world.render import Scene, Subject, render, sample_scene
from far.world.weights import verified_path


def _decode_truth(masks: list[np.ndarray], size: int = 64) -> list[list[np.ndarray]]:
    """What stage 1 would find if its heads predicted their training targets exactly."""
    heat, offset, _ = instance_targets(masks, size)
    logit = torch.logit(torch.from_numpy(heat).clamp(1e-4, 1 - 1e-4)).unsqueeze(1)
    return [instances(ms.any(0), offset[i], c) for i, (ms, c) in enumerate(zip(masks, centres(logit), strict=True))]


def test_exact_targets_group_every_rendered_scene_into_its_true_subjects():
    _, masks, _, _ = render_set(77, 200, 64)
    for ms, found in zip(masks, _decode_truth(masks), strict=True):
        truth = [m for m in ms if m.sum() >= MIN_AREA * 64 * 64]
        assert len(found) == len(truth)
        assert all(any((f == t).all() for f in found) for t in truth)


def test_two_touching_dogs_of_one_colour_are_two_subjects():
    """The old stage 1 (connected regions of one body colour) read these as one subject."""
    dogs = (Subject("dog", "red", "blue", cx=0.33, cy=0.62, size=0.4),
            Subject("dog", "red", "yellow", cx=0.64, cy=0.64, size=0.4, flip=True))
    _, masks = render(Scene("grass", dogs))
    assert cv2.connectedComponents(masks.any(0).astype(np.uint8), connectivity=4)[0] == 2  # background + one blob
    found = _decode_truth([masks])[0]
    assert len(found) == 2 and all(any((f == m).all() for f in found) for m in masks)


def test_the_centre_loss_is_lowest_at_its_target():
    _, masks, _, _ = render_set(5, 8, 64)
    heat, _, peak = (torch.from_numpy(t) for t in instance_targets(masks, 64))
    at_target = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    shifted = torch.roll(at_target, shifts=3, dims=2)  # every centre 3 px to the right
    flat = torch.full_like(at_target, -4.6)  # nothing anywhere: the initial prior
    losses = [centre_loss(x, heat, peak).item() for x in (at_target, shifted, flat)]
    assert losses[0] < 0.1 * min(losses[1:])


def test_weights_without_the_instance_heads_are_refused_by_name(tmp_path):
    path = tmp_path / "old_oracle.safetensors"
    Oracle(PixelNet(8), SubjectNet(8), 64).save(path)
    assert Oracle.load(path).pixel.pixel.out_channels == PixelNet(8).pixel.out_channels
    save_file(load_file(path), str(path), metadata={"width": "8", "subject_width": "8", "resolution": "64"})
    with pytest.raises(InvalidInputError, match=r"old_oracle.safetensors: oracle weights of format .*far world oracle"):
        Oracle.load(path)


@pytest.mark.skipif(not paths.MANIFEST.is_file(), reason="far/world/weights not exported yet (far world export)")
def test_the_shipped_oracle_reads_known_renders():
    """Held-out renders (seeds the oracle never trained on) of one and two subjects; the full figures, on
    1,000 scenes and their round trips, are bench/world.py's."""
    oracle = Oracle.load(verified_path("oracle.safetensors"))
    rng = np.random.default_rng(31)

    scenes = [sample_scene(rng, n_subjects=1 + i % 2) for i in range(40)]
    images = np.stack([render(s)[0] for s in scenes])
    acc = accuracy(oracle, scenes, images)
    assert acc["background"] == 1.0 and acc["subjects"] == 60
    assert min(acc["count"], acc["class"], acc["body"]) >= 0.9, acc


def test_accuracy_counts_each_kind_of_error_per_number_of_subjects():
    from tests.world_fixtures import TruthOracle

    rng = np.random.default_rng(9)
    scenes = [sample_scene(rng, n_subjects=k) for k in (1, 2, 2, 3)]
    images = np.stack([render(s)[0] for s in scenes])
    exact = accuracy(TruthOracle(scenes), scenes, images)
    assert exact["count"] == exact["class"] == exact["body"] == 1.0 and exact["subjects"] == 8
    assert set(exact["by_subjects"]) == {"1", "2", "3"} and exact["by_subjects"]["2"]["images"] == 2

    class DropsTheLast(TruthOracle):  # misses the rightmost subject of every scene with more than one
        def read(self, images, batch_size=64):  # noqa: ANN001, ANN202
            return [Reading(r.background, r.subjects[:-1] if len(r.subjects) > 1 else r.subjects)
                    for r in super().read(images)]

    dropped = accuracy(DropsTheLast(scenes), scenes, images)
    assert dropped["count"] == 0.25 and dropped["by_subjects"]["1"]["count"] == 1.0  # only the lone subject's
    assert dropped["by_subjects"]["3"]["count"] == 0.0
    assert dropped["too_few"] == 0.75 and dropped["too_many"] == 0.0
    assert dropped["class"] == 1 - 3 / 8 and dropped["by_subjects"]["3"]["class"] == 2 / 3


def test_the_version_mix_keeps_old_runs_reproducible_and_follows_the_render_share():
    from far.world.oracle_train import _versions

    # None is the uniform draw every oracle before oracle_v6 was trained with: the same numbers as before.
    assert np.array_equal(_versions(np.random.default_rng(5), 64, None), np.random.default_rng(5).integers(0, 3, 64))
    draws = np.concatenate([_versions(np.random.default_rng([1, s]), 32, 0.1) for s in range(200)])
    shares = np.bincount(draws, minlength=3) / len(draws)
    assert abs(shares[0] - 0.1) < 0.02 and abs(shares[1] - 0.45) < 0.03 and abs(shares[2] - 0.45) < 0.03
    assert not (_versions(np.random.default_rng(2), 256, 0.0) == 0).any()  # no clean render at all
    with pytest.raises(ValueError, match="render_share: 1.5"):
        _versions(np.random.default_rng(0), 4, 1.5)


def test_a_subject_and_its_mirror_image_are_read_alike():
    torch.manual_seed(0)
    net, crops = SubjectNet(8).eval(), torch.randn(5, 4, 32, 32)
    with torch.no_grad():
        probs, of_mirror = mirrored_probs(net, crops), mirrored_probs(net, crops.flip(-1))
        plain = {k: v.softmax(1).numpy() for k, v in net(crops).items()}
    for head, p in probs.items():
        np.testing.assert_allclose(p, of_mirror[head], atol=1e-6)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        assert not np.allclose(p, plain[head])  # the mirror image's reading is in it
