"""BYOL (Grill et al. 2020, arXiv:2006.07733): the online network's predictions against a momentum target network's
projections of the other view, with the paper's defaults."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from twinray.train.losses.byol import byol_loss, byol_momentum
from twinray.train.methods.base import MethodBase, UpdateWatch, unwrap
from twinray.train.methods.spec import MOMENTUM, MethodSpec, Setting
from twinray.train.model import parse_projector
from twinray.train.step import StepOutput


class BYOLMethod(MethodBase):
    """BYOL: each view through the online model and its predictor, and through the target network
    (`model.target`, no gradient), then the symmetric normalised MSE (byol_loss). After each optimizer update the
    target takes one EMA step at BYOL's cosine schedule from `momentum` toward 1 over the run's `total_updates`, at
    the position of `schedule` (the run's lr scheduler: its step count is the number of updates done, restored on
    resume, so a resumed run follows the same momentum). The loop steps the scheduler after train_step, so during
    after_update it counts the updates before this one."""

    name = "byol"

    def __init__(self, schedule, total_updates: int, momentum: float = 0.996):
        self.schedule, self.total_updates, self.momentum = schedule, total_updates, momentum
        self.watch = UpdateWatch()

    @classmethod
    def from_config(cls, cfg, schedule, total_updates: int) -> BYOLMethod:
        return cls(schedule, total_updates, cfg.momentum)

    @classmethod
    def model_pieces(cls, cfg) -> dict:
        """The predictor of `cfg.predictor` and a momentum encoder (the target network)."""
        return {"predictor": cfg.predictor, "momentum_encoder": True}

    def __call__(self, model: nn.Module, views: Sequence[torch.Tensor]) -> StepOutput:
        self.watch.before(model)
        target = unwrap(model).target
        features, _, p1 = model(views[0], predict=True)
        _, _, p2 = model(views[1], predict=True)
        t1, t2 = target(views[0])[1], target(views[1])[1]
        loss, terms = byol_loss(p1, p2, t1, t2)
        return StepOutput(loss, features, terms)

    def current_momentum(self) -> float:
        return byol_momentum(self.schedule.last_epoch, max(1, self.total_updates), self.momentum)

    def after_update(self, model: nn.Module) -> None:
        if self.watch.updated(model):
            unwrap(model).update_target(self.current_momentum())


def _predictor_check(value, cfg) -> None:
    """The predictor's output is compared with the target's projection, so it ends with the projector's size."""
    size = parse_projector(cfg.projector)[-1]
    if parse_projector(value)[-1] != size:
        raise ValueError(f"predictor {value!r} must end with the projector's size {size}")


PREDICTOR = Setting(
    "predictor",
    str,
    "BYOL's predictor layer sizes; it ends with the projector's size",
    _predictor_check,
    fixed=True,
    row="predictor",
)

SPEC = MethodSpec(
    key="byol",
    name="BYOL",
    paper="Grill et al. 2020, arXiv:2006.07733",
    method=BYOLMethod,
    loss=byol_loss,
    pieces="projector, `build_predictor` (train/heads.py), `MomentumEncoder`",
    projector="4096-256",
    projector_batch_norm=True,
    optimizer="lars",
    base_lr=0.2,
    base_batch=256,
    lr_scaling="linear",
    weight_decay=1.5e-6,
    schedule="cosine",
    warmup_epochs=10.0,
    settings=(MOMENTUM.at(0.996, "cosine"), PREDICTOR.at("4096-256")),
    sources={
        "projector": "section 3.3: Linear 4096, BatchNorm, ReLU, Linear 256",
        "predictor": "section 3.3: the same architecture as the projector",
        "momentum": "section 3.3: tau_base = 0.996, raised to 1 by tau = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2",
        "optimizer": "section 3.3: LARS (biases and BatchNorm excluded), lr = 0.2 x BatchSize/256 (linear "
        "rule), weight decay 1.5e-6, 10 warm-up epochs then cosine decay",
    },
)
