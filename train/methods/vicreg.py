"""VICReg (Bardes, Ponce and LeCun 2022, arXiv:2105.04906): the variance-invariance-covariance loss of the two views'
expander outputs over the global batch, with the paper's defaults."""

from __future__ import annotations

import torch

from twinray.train.losses.vicreg import vicreg_loss
from twinray.train.methods.base import TwoViewMethod
from twinray.train.methods.spec import MethodSpec, Setting, non_negative


class VICRegMethod(TwoViewMethod):
    """VICReg: the projector is the expander; train/losses/vicreg.py's loss with `coefficients` (vicreg_loss's
    keywords)."""

    name = "vicreg"

    def __init__(self, **coefficients: float):
        self.coefficients = coefficients

    @classmethod
    def from_config(cls, cfg, schedule, total_updates: int) -> VICRegMethod:
        return cls(**{**SPEC.coefficients, **{s.name: getattr(cfg, s.name) for s in SPEC.settings}})

    def loss(self, z1: torch.Tensor, z2: torch.Tensor):
        return vicreg_loss(z1, z2, **self.coefficients)


SIM_COEFF = Setting("sim_coeff", float, "VICReg's invariance weight", non_negative("sim_coeff"))
STD_COEFF = Setting("std_coeff", float, "VICReg's variance weight", non_negative("std_coeff"))
COV_COEFF = Setting("cov_coeff", float, "VICReg's covariance weight", non_negative("cov_coeff"))

SPEC = MethodSpec(
    key="vicreg",
    name="VICReg",
    paper="Bardes, Ponce and LeCun 2022, arXiv:2105.04906",
    method=VICRegMethod,
    loss=vicreg_loss,
    pieces="expander (train/heads.py `build_head`)",
    projector="8192-8192-8192",
    projector_batch_norm=True,
    optimizer="lars",
    base_lr=0.2,
    base_batch=256,
    lr_scaling="linear",
    weight_decay=1e-6,
    schedule="cosine",
    warmup_epochs=10.0,
    settings=(SIM_COEFF.at(25.0), STD_COEFF.at(25.0), COV_COEFF.at(1.0)),
    constants={"gamma": 1.0, "eps": 1e-4},
    sources={
        "projector": "section 4.1: an expander of 3 layers of 8192, BatchNorm and ReLU between them",
        "coefficients": "section 4.1: lambda = mu = 25, nu = 1; gamma = 1 and eps = 1e-4 (sections 3.1, 4.1)",
        "optimizer": "section 4.1: LARS, weight decay 1e-6, lr = base_lr x BatchSize/256 with base_lr 0.2 "
        "(linear rule), 10 warm-up epochs then cosine decay",
    },
)
