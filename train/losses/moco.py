"""MoCo v2's InfoNCE loss against a queue of negatives (He et al. 2020, https://arxiv.org/abs/1911.05722; Chen et
al. 2020, "Improved Baselines with Momentum Contrastive Learning", https://arxiv.org/abs/2003.04297)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinray.train.losses.collectives import sum_over_ranks, world_size


def info_nce_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE of N_local queries against their positive keys and a queue of K negative keys (MoCo eq. 1):
        l_q = -log( exp(q.k+ / t) / (exp(q.k+ / t) + sum_{i=1..K} exp(q.k_i / t)) ),
    with q, k+ and the queue's keys L2-normalised (as in the official code), and loss = the mean of l_q over the
    global batch of N = world_size * N_local queries.

    q: N_local x D query projections (the online encoder's), any float dtype, with their graph.
    k: N_local x D keys of the same images' other views (the momentum encoder's); detached here: keys carry no
        gradient (MoCo's stop-gradient).
    queue: K x D keys of earlier batches (train/momentum.py KeyQueue.keys), the same on every rank; detached.
    temperature: t > 0 (0.2 in MoCo v2).

    Computed in float32 (float64 stays float64), autocast off. Returns (loss, stats): loss a 0-dim tensor with the
    same global value on every rank; stats = {"positive_similarity"}: the detached global mean cosine q.k+.
    Gradients follow train/losses/collectives.py's convention. The queue is read, not updated: enqueue the keys
    after the loss (KeyQueue.enqueue), as the paper's Algorithm 1 does. Raises ValueError for mismatched shapes or
    t <= 0.
    """
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must be 2-D with equal shapes, got {tuple(q.shape)} and {tuple(k.shape)}.")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"the queue must be K x {q.shape[1]}, got {tuple(queue.shape)}.")
    if temperature <= 0:
        raise ValueError(f"the temperature must be positive, got {temperature}.")
    n = q.shape[0] * world_size()
    if n < 1:
        raise ValueError("the global batch is empty.")
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=1)
        k = F.normalize(k.detach().to(dtype), dim=1)
        negatives = F.normalize(queue.detach().to(dtype), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)  # N_local x 1
        logits = torch.cat([positive, q @ negatives.T], dim=1) / temperature  # the positive is class 0
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        local_sum = F.cross_entropy(logits, labels, reduction="sum")
        totals = sum_over_ranks(torch.stack([local_sum / n, positive.sum().detach() / n]))
    return totals[0], {"positive_similarity": totals[1].detach()}
