"""VICReg's loss over the global batch (Bardes, Ponce and LeCun 2022, https://arxiv.org/abs/2105.04906)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinray.train.losses.collectives import gather_rows, world_size


def _variance(z: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """v(Z) = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps)), Var unbiased (eqs. 1 and 2)."""
    return F.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()


def _covariance(z: torch.Tensor) -> torch.Tensor:
    """c(Z) = 1/d sum_{i != j} C(Z)_ij^2, C(Z) = 1/(n-1) sum_k (z_k - mean)(z_k - mean)^T (eqs. 3 and 4)."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    return cov.square().masked_fill(torch.eye(d, dtype=torch.bool, device=z.device), 0).sum() / d


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg of two N_local x D embeddings (the expander's outputs), over the global batch Z, Z' (n rows):
        loss = sim_coeff * s(Z, Z') + std_coeff * (v(Z) + v(Z')) + cov_coeff * (c(Z) + c(Z'))   (eq. 6)
    invariance s(Z, Z') = 1/(n d) sum_i ||z_i - z'_i||^2: the mean squared error, averaged over the d features
        too, as the paper's Algorithm 1 (F.mse_loss) and official code compute it (eq. 5 writes the sum over
        features; the default coefficients were set with the mean);
    variance v(Z) = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps)), the unbiased variance (eqs. 1, 2);
    covariance c(Z) = 1/d sum_{i != j} C(Z)_ij^2, C the unbiased covariance matrix (eqs. 3, 4).
    The official code also halves the variance term; this follows eq. 6, which does not.

    z1, z2: N_local x D, any float dtype; every rank holds the same N_local. Both are gathered from all ranks
    (autograd-aware) and every rank computes the loss of the whole global batch, as the official code does.
    Defaults: sim_coeff = std_coeff = 25, cov_coeff = 1, gamma = 1, eps = 1e-4 (the paper's section 4.1).
    Computed in float32 (float64 stays float64), autocast off. Returns (loss, stats): loss a 0-dim tensor, the same
    on every rank; stats = {"invariance", "variance", "covariance"}: detached, before the coefficients (variance
    and covariance summed over both branches). Gradients follow train/losses/collectives.py's convention. Raises
    ValueError for unequal or non-2-D shapes or a global batch under 2 (the unbiased variance needs 2 rows).
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be 2-D with equal shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    if z1.shape[0] * world_size() < 2:
        raise ValueError(f"the global batch must have at least 2 samples, got {z1.shape[0] * world_size()}.")
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        # One gather for both views: z1's columns, then z2's.
        z = gather_rows(torch.cat([z1, z2], dim=1).to(dtype))
        a, b = z[:, : z1.shape[1]], z[:, z1.shape[1] :]
        invariance = F.mse_loss(a, b)
        variance = _variance(a, gamma, eps) + _variance(b, gamma, eps)
        covariance = _covariance(a) + _covariance(b)
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    stats = {"invariance": invariance, "variance": variance, "covariance": covariance}
    return loss, {k: v.detach() for k, v in stats.items()}
