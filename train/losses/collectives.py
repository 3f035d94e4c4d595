"""The collectives every loss uses, with the gradient convention they share (after lightly's lightly/utils/dist.py).

Under torch.distributed each loss returns the same global loss L on every rank; the backward of `sum_over_ranks`
and `gather_rows` sums every rank's gradient for a rank's own rows, so the gradient reaching them is
world_size * dL/dz_local, and DDP's average over ranks turns it into the single-process gradient on the whole global
batch. Call backward on such a loss as it is; only a trainer that sums gradients over ranks itself divides by
world_size.

Gathers need the same number of rows on every rank: the trainer's batches split evenly over processes and its
loaders drop the last partial batch (train/config.py check_batch_size), so they always have. With one process (or
torch.distributed not initialised) every function returns its input.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

__all__ = ["gather_rows", "gather_rows_no_grad", "rank", "sum_over_ranks", "world_size"]


def world_size() -> int:
    """The number of processes, 1 without an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank, 0 without an initialised process group."""
    return dist.get_rank() if world_size() > 1 else 0


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """`x` (any shape and dtype) summed over all processes, with a backward that sums every rank's gradient: a plain
    dist.all_reduce drops the other ranks' gradient terms. One process: `x` itself."""
    if world_size() == 1:
        return x
    with warnings.catch_warnings():
        # Deprecated in favour of _functional_collectives, whose all_reduce only gained autograd in recent torch.
        warnings.filterwarnings("ignore", message=r".*all_reduce is deprecated", category=FutureWarning)
        return dist_nn.all_reduce(x)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` (n x ...) stacked in rank order (world_size * n x ..., `x`'s dtype), with a backward: the
    gradient of a rank's own rows is the sum of every rank's gradient for them (what the official MoCo/VICReg
    FullGatherLayer does). One process: `x` itself."""
    if world_size() == 1:
        return x
    with warnings.catch_warnings():
        # Deprecated in favour of _functional_collectives, whose all_gather only gained autograd in recent torch.
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(dist_nn.all_gather(x), dim=0)


@torch.no_grad()
def gather_rows_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` (n x ...) stacked in rank order, without a backward (the official MoCo code's
    concat_all_gather): for keys, which carry no gradient. One process: `x` itself."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
