"""Collectives the objectives share: the autograd-aware sum of train/loss.py, and gathers of rows across processes.

Gathers need the same number of rows on every rank: the trainer's batches split evenly over processes and its
loaders drop the last partial batch (train/config.py check_batch_size), so they always have.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from twinray.train.loss import _sum_over_ranks, _world_size

__all__ = ["gather_rows", "gather_rows_no_grad", "rank", "sum_over_ranks", "world_size"]

world_size = _world_size
sum_over_ranks = _sum_over_ranks


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` (n x ...) stacked in rank order (world_size * n x ...), with a backward: the gradient of a
    rank's own rows is the sum of every rank's gradient for them (what the official MoCo/VICReg FullGatherLayer
    does). One process: `x` itself."""
    if world_size() == 1:
        return x
    with warnings.catch_warnings():
        # Deprecated in favour of _functional_collectives, whose all_gather only gained autograd in recent torch.
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(dist_nn.all_gather(x), dim=0)


@torch.no_grad()
def gather_rows_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` stacked in rank order, without a backward (the official MoCo code's concat_all_gather): for
    keys, which carry no gradient."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
