"""The Method classes' common parts: `MethodBase` (what the registry calls on a method's class), `TwoViewMethod`
(both views through one network, then a loss of the two embeddings), and, for methods with a momentum encoder,
`unwrap` and `UpdateWatch`.

A Method holds no tensors: what it trains or remembers (a predictor, a momentum encoder, a queue) is in the model
(train/model.py PretrainModel), so the run's checkpoint holds it. train/step.py `train_step` runs any of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from twinray.train.step import Autocast, StepOutput


class MethodBase:
    """A method as the training step sees it (train/step.py Method: `method(model, views) -> StepOutput` and
    `after_update(model)`), plus what the registry calls on its class."""

    @classmethod
    def from_config(cls, cfg, schedule, total_updates: int) -> MethodBase:
        """The method for a validated PretrainConfig: `schedule` is the run's lr scheduler and `total_updates` the
        optimizer updates of the whole run (for a momentum schedule)."""
        raise NotImplementedError

    @classmethod
    def model_pieces(cls, cfg) -> dict:
        """PretrainModel's keyword arguments for the pieces this method adds (predictor, momentum_encoder,
        queue_size; train/model.py); none by default."""
        return {}

    def __call__(self, model: nn.Module, views: Sequence[torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def after_update(self, model: nn.Module) -> None:
        """Runs after each optimizer step (a momentum encoder's EMA); nothing by default."""


class TwoViewMethod(MethodBase):
    """A method without a momentum encoder: both views through the same model (backbone, then projector), then
    `loss(z1, z2) -> (loss, terms)` of the two N x D embeddings. Barlow Twins, SimCLR and VICReg are this; each
    supplies its loss."""

    def loss(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, views: Sequence[torch.Tensor]) -> StepOutput:
        features, z1 = model(views[0])
        _, z2 = model(views[1])
        loss, terms = self.loss(z1, z2)
        return StepOutput(loss, features, terms)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP, torch.compile and Autocast wrappers (the module that holds the weights)."""
    while True:
        if isinstance(model, (DistributedDataParallel, Autocast)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class UpdateWatch:
    """Tells whether the optimizer really updated the weights since the forward: grad accumulation's micro-steps
    and fp16 steps skipped for an overflow leave them unchanged, and then a momentum encoder must not move either.
    It reads the version counter of the model's first weight, which every in-place update bumps."""

    def __init__(self):
        self.version: int | None = None

    @staticmethod
    def _weight(model: nn.Module) -> torch.Tensor:
        return next(p for p in unwrap(model).backbone.parameters() if p.requires_grad)

    def before(self, model: nn.Module) -> None:
        self.version = self._weight(model)._version

    def updated(self, model: nn.Module) -> bool:
        return self.version is not None and self._weight(model)._version != self.version
