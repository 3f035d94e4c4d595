"""Representation health: figures that show, while pretraining runs, whether the embedding is collapsing or has
stopped learning, without a second, supervised run.

Each takes a whole evaluation's rows at once (gathered from every process) and returns plain floats. pretrain
computes them at each kNN evaluation (train/pretrain.py `evaluate`), never in the training step. docs/health.md says
what healthy and collapsed values look like.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BN_EPS = 1e-5  # the standardisation of the Barlow Twins loss (train/losses/barlow.py)


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension standard deviation of the L2-normalised embeddings.

    z: N x D (any float dtype), N >= 2. Returns 0.0 for a collapsed embedding (every row pointing the same way) and
    about 1/sqrt(D) for embeddings spread evenly over the sphere (Chen & He 2021, "Exploring Simple Siamese
    Representation Learning", sec. 4.1: a zero-mean isotropic Gaussian gives std 1/sqrt(D) after normalisation)."""
    if z.dim() != 2 or len(z) < 2:
        raise ValueError(f"embedding_std needs an N x D batch with N >= 2, got {tuple(z.shape)}")
    return F.normalize(z.double(), dim=1).std(dim=0, unbiased=False).mean().item()


@torch.no_grad()
def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, "RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised
    Representations by Their Rank", eq. 1): exp of the entropy of the normalised singular values,
    exp(-sum_k p_k log p_k) with p_k = sigma_k / ||sigma||_1 + eps. The features are not centred, as in the paper.

    features: N x F (any float dtype). Returns a float in [1, min(N, F)] (0.0 for all zeros): 1 when every row is
    the same (rank-one), close to min(N, F) for i.i.d. Gaussian rows."""
    if features.dim() != 2 or not len(features):
        raise ValueError(f"effective_rank needs an N x F matrix, got {tuple(features.shape)}")
    sigma = torch.linalg.svdvals(features.double())
    if sigma.sum() == 0:
        return 0.0  # all zeros: no direction at all
    p = sigma / sigma.sum() + eps
    return math.exp(-(p * p.log()).sum().item())


@torch.no_grad()
def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> tuple[float, float]:
    """The Barlow Twins cross-correlation matrix C of two views' embeddings (Zbontar et al. 2021, eq. 2: each
    dimension standardised over the batch, C_ij = mean_b z1_bi z2_bj), summarised as (mean of C_ii, mean of |C_ij|
    for i != j).

    z1, z2: N x D each, N >= 2. Healthy training drives the first towards 1 (the views agree) and the second towards
    0 (no redundancy); a collapsed, constant embedding gives (0, 0)."""
    if z1.dim() != 2 or z1.shape != z2.shape or len(z1) < 2:
        raise ValueError(f"cross_correlation needs two N x D batches, N >= 2, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    a, b = z1.double(), z2.double()
    a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + BN_EPS)
    b = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + BN_EPS)
    c = a.T @ b / len(a)
    d = c.shape[0]
    on = c.diagonal().mean().item()
    off = (c.abs().sum() - c.diagonal().abs().sum()).item() / max(d * d - d, 1)
    return on, off


def figures(features: torch.Tensor, z: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """The figures pretrain logs at an evaluation, under their metrics.jsonl names.

    features: N x F backbone features and z: N x D projector embeddings of the same images (the kNN bank's);
    views: (z1, z2), M x D embeddings of two augmented views of the same M images, for the cross-correlation that
    Barlow Twins drives to the identity (None: not logged). Returns {"rankme", "emb_std"} and, with views,
    {"corr_diag", "corr_off"}."""
    out = {"rankme": effective_rank(features), "emb_std": embedding_std(z)}
    if views is not None:
        out["corr_diag"], out["corr_off"] = cross_correlation(*views)
    return out
