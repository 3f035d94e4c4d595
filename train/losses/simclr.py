"""SimCLR's NT-Xent loss over the global batch (Chen et al. 2020, https://arxiv.org/abs/2002.05709)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinray.train.losses.collectives import gather_rows, rank, sum_over_ranks, world_size


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{names} must be 2-D with equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}.")


def nt_xent_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NT-Xent (normalised temperature-scaled cross entropy) of two N_local x D projections, contrasted over the
    global batch.

    The global batch holds 2N views (N images, two views each, N = world_size * N_local). For the pair (i, j) of
    views of one image, with sim the cosine similarity (SimCLR eq. 1):
        l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) ),
    so each view has 1 positive and 2N - 2 negatives (every view of every other image on every rank), and
    loss = 1/(2N) sum over all 2N views of l(view, its partner).

    z1, z2: N_local x D, any float dtype; row k of z1 and row k of z2 are the two views of one image. Every rank
        must hold the same N_local (the trainer's even split guarantees it). Computed in float32 (float64 stays
        float64), autocast off.
    temperature: t > 0 (0.1: the official SimCLR code's default; see docs/methods.md).

    Returns (loss, stats): loss a 0-dim tensor, the same global value on every rank (each rank computes the rows of
    its own views against all 2N and one sum joins them); stats = {"positive_similarity"}: the detached global mean
    cosine of positive pairs. Gradients follow train/losses/collectives.py's convention (DDP's average gives the
    single-process gradient). Raises ValueError for unequal or non-2-D shapes, a global batch under 2 images, or
    t <= 0.
    """
    _check_pair(z1, z2, "z1 and z2")
    if temperature <= 0:
        raise ValueError(f"the temperature must be positive, got {temperature}.")
    world = world_size()
    n_local = z1.shape[0]
    n = n_local * world
    if n < 2:
        raise ValueError(f"the global batch must have at least 2 images, got {n}.")
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        a1, a2 = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)
        candidates = torch.cat([gather_rows(a1), gather_rows(a2)])  # 2N x D: all first views, then all second
        anchors = torch.cat([a1, a2])  # 2N_local x D: this rank's views
        own = torch.arange(n_local, device=z1.device) + rank() * n_local
        self_index = torch.cat([own, own + n])  # where each anchor sits among the candidates
        partner = torch.cat([own + n, own])
        logits = anchors @ candidates.T / temperature
        logits = logits.masked_fill(
            torch.arange(2 * n, device=z1.device) == self_index[:, None], float("-inf")
        )  # k != i
        local_sum = F.cross_entropy(logits, partner, reduction="sum")
        positive = (a1 * a2).sum(dim=1).sum().detach()
        totals = sum_over_ranks(torch.stack([local_sum / (2 * n), positive / n]))  # one collective for both
    return totals[0], {"positive_similarity": totals[1].detach()}
