"""Barlow Twins loss over the global batch (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230)."""

from __future__ import annotations

import torch

from twinray.train.losses.collectives import sum_over_ranks, world_size

BN_EPS = 1e-5  # BatchNorm1d's default, so the standardisation is exactly BatchNorm1d(affine=False) in training mode


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Barlow Twins loss of two N_local x D embeddings, standardised and correlated over the global batch.

    Returns (loss, stats): loss = sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2 (a float32 or float64 scalar,
    the same value on every rank) and stats = {"on_diag", "off_diag"} (detached 0-dim tensors, off_diag before
    lambd; `float()` them to log). Nothing here waits for the GPU, so a trainer can queue the next step at once.

    z1, z2: N_local x D, any float dtype (bf16/fp16 are computed in float32, float64 stays float64; autocast off).
    Each feature is standardised over the global batch as BatchNorm1d(affine=False) in training mode (biased
    variance, eps BN_EPS), and c = z1_std^T z2_std / N (the paper's eq. 1 and Algorithm 1).

    Under torch.distributed every rank returns the same global loss L, and the backward of each all_reduce sums
    every rank's gradient, so autograd differentiates world_size * L: the gradient reaching a rank's own rows is
    world_size * dL/dz_local. DDP averages parameter gradients over ranks, which cancels that factor exactly: with
    DDP (or Accelerate), call backward on this loss as it is, and the gradient equals the single-process gradient
    on the whole global batch (train/losses/collectives.py). Do not multiply (or divide) the loss by world_size.

    Raises ValueError for unequal or non-2-D shapes, or a global batch under 2 samples.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be 2-D with equal shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    d = z1.shape[1]
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)  # bf16/fp16 -> float32
    # Autocast would run the matmuls in half precision again, whatever the inputs' dtype.
    with torch.autocast(z1.device.type, enabled=False):
        z = torch.cat([z1, z2], dim=1).to(dtype)  # both views side by side: one collective per statistic
        # The batch size is known on the host, so checking it never waits for the GPU. Across processes every
        # rank must hold a sample (drop_last shards always do), which makes the global batch at least 2.
        world = world_size()
        if z.shape[0] < (1 if world > 1 else 2):
            raise ValueError(f"the global batch must have at least 2 samples, got {z.shape[0]} on this rank.")
        n = z.shape[0] if world == 1 else sum_over_ranks(torch.full((), z.shape[0], dtype=dtype, device=z.device))
        # Two passes (mean, then centred squares) stay accurate for embeddings far from zero.
        mean = sum_over_ranks(z.sum(dim=0)) / n
        var = sum_over_ranks((z - mean).square().sum(dim=0)) / n  # biased, as BatchNorm normalises
        z = (z - mean) / torch.sqrt(var + BN_EPS)
        c = sum_over_ranks(z[:, :d].T @ z[:, d:]) / n  # D x D cross-correlation of the global batch
        on_diag = (1 - c.diagonal()).square().sum()
        off_diag = c.square().masked_fill(torch.eye(d, dtype=torch.bool, device=c.device), 0).sum()
        loss = on_diag + lambd * off_diag
    # Detached device scalars: reading them is a device sync, which a trainer does only when it logs.
    return loss, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}
