"""What a run across processes and nodes needs beyond Accelerate: agreeing on an early stop, and counting nodes.

Accelerate (through torch.distributed) runs the processes; twinray's loaders give each rank its disjoint part of every
epoch (pipelines/loader.py). docs/distributed.md tells how to launch.
"""

from __future__ import annotations

import os
import signal
import socket

import torch
import torch.distributed as dist


class StopVote:
    """An early stop that every rank takes after the same step.

    A signal (SIGTERM from a scheduler, SIGINT) reaches the ranks at different moments. A rank that stopped alone
    would wait in the checkpoint's barrier while the others wait in the next step's gradient all-reduce: a hang.
    So each step, every rank posts its own flag to a MAX all-reduce and reads the previous step's result. The
    all-reduce runs on a separate gloo group on the CPU and is not waited for until the next step, so it neither
    syncs the GPU nor waits on the network in the step's path. All ranks see the same result after the same step:
    a stop comes one step after the signal reached the first rank.
    """

    def __init__(self):
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")  # every rank creates it, in the same order
        self._pending = None

    def __call__(self, local: str | None) -> str | None:
        """`local`: this rank's reason to stop (a signal's name) or None. Returns the agreed reason or None."""
        if self.group is None:
            return local
        agreed = None
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            if flag.item():
                agreed = signal.Signals(int(flag.item())).name
        flag = torch.tensor([signal.Signals[local].value if local else 0], dtype=torch.int64)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def close(self) -> None:
        """Waits for the last posted vote (every rank posts the same number)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def node_id() -> str:
    """This process' node: the host name, and torchrun's node rank (GROUP_RANK) where set, so that two agents on one
    machine (the tests' loopback runs) count as two nodes."""
    return f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '0')}"


def count_nodes() -> int:
    """How many nodes the run's processes are on. A collective: every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1
    ids: list = [None] * dist.get_world_size()
    dist.all_gather_object(ids, node_id())
    return len(set(ids))
