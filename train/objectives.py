"""The self-supervised methods as the training step runs them (train/step.py's `Method`): each takes the batch's two
views through the model and returns its loss, and moves its momentum encoder after each optimizer update.

The methods hold no tensors: what they train or remember (a predictor, a momentum encoder, a queue) is in the model
(train/model.py PretrainModel), so the run's checkpoint holds it. `build_method` makes the one a config asks for;
pretrain never branches on a method's name. The losses are train/loss.py's and train/losses/; the defaults are
train/methods.py's; docs/methods.md says what each does and why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from twinray.train.losses import byol_loss, byol_momentum, info_nce_loss, nt_xent_loss, vicreg_loss
from twinray.train.methods import METHODS
from twinray.train.momentum import shuffled_forward
from twinray.train.step import Autocast, BarlowTwinsMethod, Method, StepOutput, TwoViewMethod


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP, torch.compile and Autocast wrappers (the module that holds the weights)."""
    while True:
        if isinstance(model, (DistributedDataParallel, Autocast)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class _UpdateWatch:
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


class SimCLRMethod(TwoViewMethod):
    """SimCLR (Chen et al. 2020): NT-Xent over the global batch at `temperature`."""

    name = "simclr"

    def __init__(self, temperature: float = 0.1):
        self.temperature = temperature

    def loss(self, z1: torch.Tensor, z2: torch.Tensor):
        return nt_xent_loss(z1, z2, self.temperature)


class VICRegMethod(TwoViewMethod):
    """VICReg (Bardes et al. 2022): the projector is the expander; the variance-invariance-covariance loss over the
    global batch with `coefficients` (vicreg_loss's keywords)."""

    name = "vicreg"

    def __init__(self, **coefficients: float):
        self.coefficients = coefficients

    def loss(self, z1: torch.Tensor, z2: torch.Tensor):
        return vicreg_loss(z1, z2, **self.coefficients)


class MoCoMethod:
    """MoCo v2 (He et al. 2020; Chen et al. 2020), in the order of MoCo's Algorithm 1: queries of the first view
    from the online model, keys of the second view from the momentum encoder (`model.target`) with shuffled
    BatchNorm over chunks of `key_bn_chunk` images (train/momentum.py shuffled_forward, whose permutation comes
    from torch's global generator, which checkpoints hold), InfoNCE against `model.queue` at `temperature`, then
    the keys enqueued. After each optimizer update, the key encoder takes one EMA step at the constant
    `momentum`."""

    name = "moco"

    def __init__(self, temperature: float = 0.2, momentum: float = 0.999, key_bn_chunk: int = 32):
        self.temperature, self.momentum, self.key_bn_chunk = temperature, momentum, key_bn_chunk
        self.watch = _UpdateWatch()

    def __call__(self, model: nn.Module, views: Sequence[torch.Tensor]) -> StepOutput:
        self.watch.before(model)
        bare = unwrap(model)
        features, q = model(views[0])
        _, k = shuffled_forward(bare.target, views[1], self.key_bn_chunk)
        loss, terms = info_nce_loss(q, k, bare.queue.keys, self.temperature)
        bare.queue.enqueue(k)  # after the loss, which read the queue without these keys
        return StepOutput(loss, features, terms)

    def after_update(self, model: nn.Module) -> None:
        if self.watch.updated(model):
            unwrap(model).update_target(self.momentum)


class BYOLMethod:
    """BYOL (Grill et al. 2020): each view through the online model and its predictor, and through the target
    network (`model.target`, no gradient), then the symmetric normalised MSE (byol_loss). After each optimizer
    update the target takes one EMA step at BYOL's cosine schedule from `momentum` toward 1 over the run's
    `total_updates`, at the position of `schedule` (the run's lr scheduler: its step count is the number of
    updates done, restored on resume, so a resumed run follows the same momentum). The loop steps the scheduler
    after train_step, so during after_update it counts the updates before this one."""

    name = "byol"

    def __init__(self, schedule, total_updates: int, momentum: float = 0.996):
        self.schedule, self.total_updates, self.momentum = schedule, total_updates, momentum
        self.watch = _UpdateWatch()

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


def build_method(cfg, schedule, total_updates: int) -> Method:
    """The Method of a validated PretrainConfig, with its fields: `schedule` is the run's lr scheduler and
    `total_updates` the optimizer updates of the whole run (BYOL's momentum schedule)."""
    makers = {
        "barlow": lambda: BarlowTwinsMethod(cfg.lambd),
        "simclr": lambda: SimCLRMethod(cfg.temperature),
        "moco": lambda: MoCoMethod(cfg.temperature, cfg.momentum, cfg.key_bn_chunk),
        "byol": lambda: BYOLMethod(schedule, total_updates, cfg.momentum),
        "vicreg": lambda: VICRegMethod(
            **{
                **METHODS["vicreg"].coefficients,
                "sim_coeff": cfg.sim_coeff,
                "std_coeff": cfg.std_coeff,
                "cov_coeff": cfg.cov_coeff,
            }
        ),
    }
    return makers[cfg.method]()


def model_pieces(cfg) -> dict:
    """PretrainModel's keyword arguments for a config: the projector (with BatchNorm or not, per method), and the
    pieces the method's fields call for (a predictor, a momentum encoder, a queue)."""
    return {
        "projector_batch_norm": METHODS[cfg.method].projector_batch_norm,
        "predictor": cfg.predictor,
        "momentum_encoder": cfg.momentum is not None,
        "queue_size": cfg.queue_size,
    }
