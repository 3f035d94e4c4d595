"""BYOL's loss and its target momentum schedule (Grill et al. 2020, https://arxiv.org/abs/2006.07733)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from twinray.train.losses.collectives import sum_over_ranks, world_size


def byol_loss(
    p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BYOL's symmetric normalised mean squared error (BYOL eq. 2 and its symmetrisation):
        L(p, t) = || p/||p|| - t/||t|| ||^2 = 2 - 2 <p, t> / (||p|| ||t||)   per image,
        loss = mean over the global batch of  L(p1, t2) + L(p2, t1),
    where p1, p2 are the online network's predictions for views 1 and 2 and t1, t2 the target network's
    projections of the same views (so each prediction is compared with the OTHER view's target).

    p1, p2, t1, t2: N_local x D, any float dtype. t1, t2 are detached here (BYOL's stop-gradient on the target).
    Computed in float32 (float64 stays float64), autocast off. Returns (loss, stats): loss a 0-dim tensor in
    [0, 8], the same global value on every rank; stats = {"cosine"}: the detached global mean of the two cosines.
    Gradients follow train/losses/collectives.py's convention. Raises ValueError for mismatched or non-2-D
    shapes.
    """
    for name, x in (("p2", p2), ("t1", t1), ("t2", t2)):
        if x.shape != p1.shape:
            raise ValueError(f"{name} must have p1's shape {tuple(p1.shape)}, got {tuple(x.shape)}.")
    if p1.dim() != 2:
        raise ValueError(f"p1, p2, t1 and t2 must be 2-D, got {tuple(p1.shape)}.")
    n = p1.shape[0] * world_size()
    if n < 1:
        raise ValueError("the global batch is empty.")
    dtype = torch.promote_types(p1.dtype, torch.float32)
    with torch.autocast(p1.device.type, enabled=False):

        def cosine(p, t):
            return F.cosine_similarity(p.to(dtype), t.detach().to(dtype), dim=1)  # N_local

        cos = cosine(p1, t2) + cosine(p2, t1)
        local_sum = (4 - 2 * cos).sum()  # (2 - 2 cos_a) + (2 - 2 cos_b) per image
        totals = sum_over_ranks(torch.stack([local_sum / n, cos.sum().detach() / (2 * n)]))
    return totals[0], {"cosine": totals[1].detach()}


def byol_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """The target network's EMA rate at optimizer step `step` of `total_steps` (BYOL section 3.2):
    tau = 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2, from `base` at step 0 up to 1 at the end.
    Steps past the end stay at 1. Raises ValueError for total_steps < 1, step < 0 or base outside [0, 1]."""
    if total_steps < 1 or step < 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got step {step} of {total_steps}.")
    if not 0 <= base <= 1:
        raise ValueError(f"the base momentum must be in [0, 1], got {base}.")
    progress = min(step, total_steps) / total_steps
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
