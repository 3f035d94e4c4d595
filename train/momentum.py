"""The model pieces of the momentum methods: an EMA copy of an encoder (MoCo's key encoder, BYOL's target
network), MoCo's queue of keys, and MoCo's shuffled BatchNorm.

They are modules, so a model that holds them puts their weights and buffers (the EMA weights, the queue and its
pointer) in its state_dict, and so in every checkpoint. The heads and BYOL's predictor are in train/heads.py, the
losses in train/losses/, each method (its defaults, its Method) in train/methods/<name>.py.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from twinray.train.losses.collectives import gather_rows_no_grad


class MomentumEncoder(nn.Module):
    """An exponential moving average of an online network (MoCo's key encoder, BYOL's target network).

    Built as a deep copy of `online` (same architecture, same starting weights), with no gradient. `update(online,
    m)` moves each parameter: target = m * target + (1 - m) * online (MoCo eq. 2, BYOL section 3.1). Buffers
    (BatchNorm's running statistics) are not averaged: the copy's own forwards keep them, as in both official
    codes. Its forward runs without autograd. The weights are in this module's state_dict ("module." prefix), so
    they go into checkpoints with the model that holds it.
    """

    def __init__(self, online: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(online)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module, m: float) -> None:
        """One EMA step towards `online` (the module this was copied from, or a DDP/compile wrapper of it: the
        parameters are matched in order). m in [0, 1]: 1 leaves the copy as it is, 0 copies `online`. Raises
        ValueError for m outside [0, 1] or a different number or shapes of parameters. Queues device work only."""
        if not 0 <= m <= 1:
            raise ValueError(f"the momentum must be in [0, 1], got {m}")
        targets, sources = list(self.module.parameters()), [p.detach() for p in online.parameters()]
        if len(targets) != len(sources) or any(t.shape != s.shape for t, s in zip(targets, sources, strict=True)):
            raise ValueError("the online network's parameters do not match the momentum encoder's")
        torch._foreach_lerp_(targets, sources, 1 - m)  # t + (1 - m)(s - t) = m t + (1 - m) s, fused

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class KeyQueue(nn.Module):
    """MoCo's queue of negative keys: a K x D ring buffer of L2-normalised keys and the pointer to its oldest row.

    Both are registered buffers (`keys`, `ptr`), so the queue and its position are in the state_dict and every
    checkpoint. It starts as random unit vectors (the official code's start), drawn from `generator` (seed every
    rank alike: the queue must be the same on all ranks, and DDP's buffer broadcast keeps rank 0's).
    """

    def __init__(self, size: int = 65536, dim: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dimension must be positive, got {size} x {dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Replaces the oldest rows with this step's keys from EVERY rank, in rank order (gathered as the official
        code's concat_all_gather does), so every rank's queue stays the same. k: N_local x D keys, any float dtype,
        normalised here; stored in the queue's dtype. The write wraps around the end; the pointer moves by the
        global batch. Nothing waits for the device. Raises ValueError when the global batch is larger than the
        queue or D does not match."""
        keys = gather_rows_no_grad(F.normalize(k.detach().to(self.keys.dtype), dim=1))
        size = self.keys.shape[0]
        if keys.dim() != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"keys must be N x {self.keys.shape[1]}, got {tuple(k.shape)}")
        if keys.shape[0] > size:
            raise ValueError(f"the global batch ({keys.shape[0]}) is larger than the queue ({size})")
        rows = (self.ptr + torch.arange(keys.shape[0], device=self.keys.device)) % size
        self.keys.index_copy_(0, rows, keys)
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


def shuffled_forward(
    encoder: nn.Module, x: torch.Tensor, chunk: int = 32, generator: torch.Generator | None = None
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """MoCo's shuffled BatchNorm on one process: `encoder(x)` with BatchNorm statistics taken over random chunks.

    MoCo (section 3.3) computes the key encoder's BatchNorm per GPU over a batch shuffled across its 8 GPUs, so a
    query and its positive key do not share BatchNorm statistics (which would let the model find the positive by
    its batch signature). twinray runs the key encoder per process instead: it permutes the process's batch, runs
    `encoder` on B // chunk near-equal consecutive chunks of at least `chunk` rows (each chunk its own BatchNorm
    batch, as one of the paper's GPUs with its 32 images) and puts the outputs back in the input's order. This
    works the same on one GPU (the study's setting), where the paper's cross-GPU shuffle would change nothing,
    and needs no collective. Across processes each rank shuffles only its own rows, so a 2-process run's keys
    differ from a 1-process run's, as the paper's per-GPU statistics do; docs/methods.md gives the reasons.

    x: B x ... any dtype the encoder takes; the permutation is drawn on the CPU from `generator` (the global RNG
    when None) and copied to x's device without a sync. Returns the encoder's output for x, row k for x[k] (a
    tuple of such tensors when the encoder returns a tuple, as BarlowTwins-style models return (features, z)).
    """
    if chunk < 1:
        raise ValueError(f"the chunk must have at least one row, got {chunk}")
    order = torch.randperm(x.shape[0], generator=generator).to(x.device, non_blocking=True)
    # near-equal chunks of at least `chunk` rows
    parts = x.index_select(0, order).tensor_split(max(1, x.shape[0] // chunk))
    outputs = [encoder(part) for part in parts]

    def restore(pieces: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.cat(pieces)
        return torch.empty_like(joined).index_copy_(0, order, joined)  # row order[i] gets output i

    if isinstance(outputs[0], torch.Tensor):
        return restore(outputs)
    return tuple(restore(list(pieces)) for pieces in zip(*outputs, strict=True))
