"""The training step, written once: pretrain, lr_find and both training benchmarks run this very code.

A step is: the method's loss on the batch's views, backward, the optimizer update, then (optionally) the online probe
on the first view's detached features (`train_step`); for pretrain, under Accelerate's gradient accumulation, with
--eval-data's probe stream and the lr schedule once per update. The method supplies the forward and the
loss (`Method`), so the loop never branches on a method's name.
The methods themselves are in train/methods/, one module each.

Nothing here waits for the device: the figures come back as detached 0-dim device tensors, which the trainer reads
one step later (train/meter.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

# torch.compile's modes that the trainer accepts (`--compile-mode`). `reduce-overhead` records CUDA graphs, which
# need fixed shapes: the trainer's drop_last loaders give them. `max-autotune` also records CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


@dataclass
class StepOutput:
    """What a method's forward returns for one batch.

    loss: 0-dim float32 (or float64) tensor with its graph; the step backpropagates it.
    features: N x F backbone features of the first view (any float dtype), for the online probe.
    terms: named detached 0-dim tensors logged beside the loss (Barlow Twins: on_diag, off_diag).
    """

    loss: torch.Tensor
    features: torch.Tensor
    terms: dict[str, torch.Tensor]


class Method(Protocol):
    """A self-supervised method as the step sees it. `model` is what the trainer built and wrapped (compiled,
    DDP); a method whose model holds more (a predictor, a momentum encoder, a queue) keeps it in that module, so
    that the run's checkpoint holds it. `after_update` runs after each optimizer step (a momentum encoder's EMA)."""

    def __call__(self, model: nn.Module, views: Sequence[torch.Tensor]) -> StepOutput: ...

    def after_update(self, model: nn.Module) -> None: ...


def train_step(
    model: nn.Module,
    method: Method,
    views: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    backward: Callable[[torch.Tensor], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    probe=None,
    labels: torch.Tensor | None = None,
    accelerator=None,
    scheduler=None,
    side=None,
) -> dict[str, torch.Tensor]:
    """One training step on one batch of views (each B x C x S x S on the model's device).

    backward: how the loss is backpropagated; `loss.backward()` by default.
    scaler: a GradScaler for fp16 without Accelerate (bench/resources.py); None otherwise.
    probe, labels: the online linear probe (train/online_eval.py) and the batch's labels; the probe learns from
        the first view's detached features after the update.
    accelerator: pretrain's Accelerator, built with `gradient_accumulation_steps`: the step runs inside
        `accelerator.accumulate(model)` and backpropagates with `accelerator.backward` (in place of `backward`),
        which scales fp16 losses and divides by the accumulation steps; DDP syncs gradients only on the last of
        them, and the prepared optimizer skips the update on the others. None: every step is an update.
    scheduler: the lr schedule (train/optim.py), stepped after each optimizer update: with an accelerator only
        where `accelerator.sync_gradients` (not on accumulation steps). None: the caller steps it.
    side: --eval-data's probe stream (train/online_eval.py ProbeStream: `step() -> figures`), one update on its
        own next batch after the step's, inside the same `accumulate` block; None without --eval-data.

    Returns the step's figures, detached 0-dim device tensors, unread: "loss", the method's terms, and
    "probe_loss"/"probe_acc" with a probe or a side stream. Reading them is a device sync, which the caller does
    one step later.
    """
    if accelerator is not None:
        backward = accelerator.backward
    with accelerator.accumulate(model) if accelerator is not None else contextlib.nullcontext():
        new_iteration()
        out = method(model, views)
        if scaler is not None:
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            (backward or torch.Tensor.backward)(out.loss)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_update(model)
        figures = {"loss": out.loss.detach(), **out.terms}
        if probe is not None:
            figures.update(probe.step(out.features, labels))
        if side is not None:  # --eval-data's probe, on its side stream's next batch
            figures.update(side.step())
        if scheduler is not None and (accelerator is None or accelerator.sync_gradients):
            scheduler.step()  # an update happened: the schedule moves on
    return figures


def new_iteration() -> None:
    """Tells CUDA graphs (compile modes reduce-overhead and max-autotune) that an iteration starts: they reuse their
    output buffers, and the model runs twice (two views) before its backward. A counter bump where torch.compile has
    run; nothing otherwise (importing inductor just for it would cost seconds in an eager run)."""
    if "torch._inductor.cudagraph_trees" in sys.modules:
        torch.compiler.cudagraph_mark_step_begin()


def compile_model(model: nn.Module, compile: bool, mode: str = "default") -> nn.Module:
    """`torch.compile(model, mode=mode)` when `compile`, else the model itself. Compilation happens at the first
    step (and again for a new shape or for eval mode), which is why the first metrics window is a warm-up."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=mode) if compile else model


class Autocast(nn.Module):
    """Runs `module`'s forward under torch.autocast(dtype), as Accelerate's prepared model does for
    `--mixed-precision bf16`: the forward only, so that the loss (which turns autocast off itself), the backward
    and the probe stay outside. For code that times the step without an Accelerator (the benchmarks)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor, **kwargs):
        with torch.autocast(x.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.module(x, **kwargs)
