"""far/losses.py: diffusion targets, prior split, masked loss, Localized Refinement terms."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from far.losses import (
    attention_in_mask,
    diffusion_target,
    downsample_mask,
    normalize_maps,
    per_sample_mse,
    refine_losses,
    split_prior,
)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_target_follows_the_scheduler_config(kind):
    sched = DDPMScheduler(prediction_type=kind)
    x, n, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    target = diffusion_target(sched, x, n, t)
    if kind == "epsilon":
        assert target is n
    else:
        a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a * n - s * x)


def test_prior_split_does_not_depend_on_batch_order():
    losses = torch.tensor([1.0, 2.0, 3.0, 10.0])
    prior = torch.tensor([False, True, False, True])
    inst, pri = split_prior(losses, prior)
    assert inst.item() == 2.0 and pri.item() == 6.0
    perm = torch.tensor([3, 0, 1, 2])
    assert [v.item() for v in split_prior(losses[perm], prior[perm])] == [2.0, 6.0]
    inst, pri = split_prior(losses[:1], prior[:1])
    assert pri.item() == 0.0 and inst.item() == 1.0


def test_masked_mse_counts_only_the_mask():
    pred, target = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    target[..., 2:, :] = 5.0  # error only in the bottom half
    top = torch.zeros(1, 1, 4, 4)
    top[..., :2, :] = 1
    assert per_sample_mse(pred, target, top).item() == 0.0
    assert per_sample_mse(pred, target, 1 - top).item() == 25.0
    assert per_sample_mse(pred, target).item() == 12.5


def test_refine_is_zero_for_a_map_equal_to_the_mask_and_high_for_the_wrong_one():
    mask = torch.zeros(1, 2, 16)
    mask[0, 0, :4], mask[0, 1, 8:12] = 1, 1
    good = mask.transpose(1, 2) * 0.3  # (B, HW, K): attention exactly on its own mask, any scale
    swapped = good.flip(-1)  # each concept attends to the other's region
    valid = torch.tensor([[True, True]])
    r_good, e_good = refine_losses({"l": good}, {"l": mask}, valid, "max")
    r_bad, e_bad = refine_losses({"l": swapped}, {"l": mask}, valid, "max")
    assert r_good.item() == pytest.approx(0.0, abs=1e-6) and e_good.item() == pytest.approx(0.0, abs=1e-6)
    assert r_bad.item() == pytest.approx(0.5) and e_bad.item() == pytest.approx(1.0)
    r_sum, _ = refine_losses({"l": good}, {"l": mask}, valid, "sum")
    assert r_sum.item() == pytest.approx(0.0, abs=1e-6)
    assert attention_in_mask({"l": good}, {"l": mask}, valid) == pytest.approx(1.0)
    assert attention_in_mask({"l": swapped}, {"l": mask}, valid) == pytest.approx(0.0)
    # invalid pairs (concept not in the image or not in the prompt) do not count
    r_none, _ = refine_losses({"l": swapped}, {"l": mask}, torch.tensor([[False, False]]))
    assert r_none.item() == 0.0
    r_one, _ = refine_losses({"l": swapped}, {"l": mask}, torch.tensor([[True, False]]))
    assert r_one.item() == pytest.approx(0.5)


def test_exclusivity_is_averaged_over_the_pairs_that_have_other_concepts_in_the_image():
    mask = torch.zeros(2, 2, 16)
    mask[0, 0, :4], mask[0, 1, 8:12] = 1, 1  # row 0: both concepts
    mask[1, 0, :4] = 1  # row 1: concept 0 alone
    swapped = mask[0:1].transpose(1, 2).flip(-1)  # row 0: each concept attends to the other's region
    maps = torch.cat([swapped, mask[1:2].transpose(1, 2)])  # (2, 16, 2); row 1 attends to its own mask
    valid = torch.tensor([[True, True], [True, False]])
    refine, excl = refine_losses({"l": maps}, {"l": mask}, valid)
    assert excl.item() == pytest.approx(1.0)  # the lone-concept row has no exclusivity term to dilute it
    assert refine.item() == pytest.approx((0.5 + 0.5 + 0.0) / 3)  # refine still counts every valid pair
    _, only_single = refine_losses({"l": maps[1:]}, {"l": mask[1:]}, valid[1:])
    assert only_single.item() == 0.0


def test_normalize_and_downsample():
    a = torch.tensor([[1.0, 2.0, 4.0]])
    assert normalize_maps(a, "max").tolist() == [[0.25, 0.5, 1.0]]
    assert normalize_maps(a, "sum").sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="normalize"):
        normalize_maps(a, "l2")
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, :2, :3] = True
    small = downsample_mask(m, (4, 4))  # soft: covered fraction of each 2x2 cell
    assert small[0, 0, :2].tolist() == [1.0, 0.5] and small.sum().item() == pytest.approx(6 / 4)
