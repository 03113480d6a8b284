"""Training losses: diffusion (epsilon / v), masked diffusion, prior preservation, Localized Refinement.

    L = L_diffusion + prior_weight * L_prior + refine.weight * L_refine + refine.exclusivity_weight * L_excl

Choices the paper leaves open (ours):
- Prior rows are recognised by their `kind` ("prior"), not by their position in the batch: each sample's
  loss is computed separately and averaged over the concept rows (L_diffusion) and the prior rows
  (L_prior); a batch without prior rows contributes L_prior = 0. No concat/chunk order to get wrong.
- Masked variant: the squared error is averaged over the union of the row's concept masks (soft, at
  latent resolution); rows without masks (priors) keep the plain loss.
- Refinement: map A (B, HW) of a concept = head- and token-averaged probabilities; normalised A/max(A)
  (default; or A/sum(A) against M/sum(M), or raw), MSE against the soft mask M (area-downsampled {0,1}
  mask, values in [0,1]) at the map's resolution; mean over layers and over (row, concept) pairs whose
  concept is in the image and whose identifier is in the prompt.
- Exclusivity: mean of the normalised A over the cells covered by other concepts (not by k itself), averaged
  over layers and the valid pairs whose image holds another concept (a single-subject row has no such term,
  so it does not dilute the mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts, per the scheduler config: the noise (epsilon) or the velocity (v_prediction)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config (epsilon | v_prediction)")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean squared error of (B, C, h, w) tensors; with weight (B, 1, h, w) in [0,1] a weighted mean."""
    se = (pred.float() - target.float()) ** 2
    if weight is None:
        return se.mean(dim=(1, 2, 3))
    w = weight.float().expand_as(se)
    return (se * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(EPS)


def split_prior(per_sample: torch.Tensor, is_prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of (B,) losses over concept rows and over prior rows (0 when a group is empty)."""
    is_prior = is_prior.to(per_sample.device)
    zero = per_sample.sum() * 0.0  # keeps the graph and the dtype
    inst = per_sample[~is_prior].mean() if (~is_prior).any() else zero
    prior = per_sample[is_prior].mean() if is_prior.any() else zero
    return inst, prior


def normalize_maps(maps: torch.Tensor, how: str) -> torch.Tensor:
    """Normalise attention maps (..., HW) over their last dim: 'max' -> A/max A, 'sum' -> A/sum A, 'none'."""
    if how == "max":
        return maps / maps.amax(dim=-1, keepdim=True).clamp_min(EPS)
    if how == "sum":
        return maps / maps.sum(dim=-1, keepdim=True).clamp_min(EPS)
    if how == "none":
        return maps
    raise ValueError(f"train.refine.normalize: {how!r} is not one of max, sum, none")


def _layer_terms(
    maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, how: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over valid (b, k) of the refine MSE and of the exclusivity term, and the number of pairs the
    exclusivity sum covers (valid pairs with another concept's cells in the image), for one layer.

    maps (B, HW, K) probabilities; masks (B, K, HW) soft {0..1} at the same resolution; valid (B, K) bool.
    """
    a = normalize_maps(maps.float().transpose(1, 2), how)  # (B, K, HW)
    m = masks.float()
    target = m / m.sum(-1, keepdim=True).clamp_min(EPS) if how == "sum" else m
    mse = ((a - target) ** 2).mean(-1)  # (B, K)
    others = (m.sum(1, keepdim=True) - m).clamp(0, 1) * (1 - m)  # (B, K, HW): other concepts' cells, not k's
    excl = (a * others).sum(-1) / others.sum(-1).clamp_min(EPS)  # (B, K)
    v = valid.float()
    with_others = v * (others.sum(-1) > 0).float()  # (B, K)
    return (mse * v).sum(), (excl * with_others).sum(), with_others.sum()


def refine_losses(
    maps: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    valid: torch.Tensor,
    normalize: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_refine, L_exclusivity): means over layers and valid (row, concept) pairs (for L_exclusivity only
    the pairs whose image holds another concept); each is zero when it has no pair.

    maps: layer -> (B, HW, K); masks: layer -> (B, K, HW) soft masks at that layer's resolution.
    """
    zero = sum(a.sum() for a in maps.values()) * 0.0 if maps else torch.zeros(())  # keeps the graph
    n = valid.sum() * len(maps)
    refine, excl, n_excl = zero, zero, 0.0
    for name, a in maps.items():
        r, e, ne = _layer_terms(a, masks[name].to(a.device), valid.to(a.device), normalize)
        refine, excl, n_excl = refine + r, excl + e, n_excl + ne
    return (refine / n if n > 0 else zero), (excl / n_excl if n_excl > 0 else zero)


def attention_in_mask(maps: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], valid: torch.Tensor) -> float:
    """Share of each concept's attention mass inside its own (soft) mask, mean over layers and valid pairs.

    The score that Localized Refinement should raise; 1.0 = all attention inside the mask. NaN if no pair.
    """
    scores = []
    for name, a in maps.items():
        a = a.detach().float().transpose(1, 2)  # (B, K, HW)
        m = masks[name].to(a.device).float()
        share = (a * m).sum(-1) / a.sum(-1).clamp_min(EPS)  # (B, K)
        scores.append(share[valid.to(a.device)])
    if not scores or sum(s.numel() for s in scores) == 0:
        return float("nan")
    return torch.cat(scores).mean().item()


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) {0,1} mask -> (..., h, w) soft mask: the fraction of each cell covered (area average)."""
    lead = mask.shape[:-2]
    flat = mask.float().reshape(-1, 1, *mask.shape[-2:])
    out = F.adaptive_avg_pool2d(flat, size)
    return out.reshape(*lead, *size)
