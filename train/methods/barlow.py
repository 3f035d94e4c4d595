"""Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230): the cross-correlation loss of the two views' embeddings,
with twinray's own defaults (the study's settings), so that today's behaviour stays the default."""

from __future__ import annotations

import torch

from twinray.train.losses.barlow import barlow_twins_loss
from twinray.train.methods.base import TwoViewMethod
from twinray.train.methods.spec import STUDY_BATCH, MethodSpec, Setting, positive


class BarlowTwinsMethod(TwoViewMethod):
    """Barlow Twins: train/losses/barlow.py's loss between the two views' embeddings. `lambd` weighs the
    off-diagonal term (5e-3, the paper's and the study's value)."""

    name = "barlow_twins"

    def __init__(self, lambd: float = 5e-3):
        self.lambd = lambd

    @classmethod
    def from_config(cls, cfg, schedule, total_updates: int) -> BarlowTwinsMethod:
        return cls(cfg.lambd)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor):
        return barlow_twins_loss(z1, z2, self.lambd)


LAMBD = Setting("lambd", float, "Barlow Twins' weight of the off-diagonal terms", positive("lambd"))

SPEC = MethodSpec(
    key="barlow",
    name="Barlow Twins",
    paper="Zbontar et al. 2021, arXiv:2103.03230",
    method=BarlowTwinsMethod,
    loss=barlow_twins_loss,
    pieces="projector (train/heads.py `build_projector`)",
    projector="512",
    projector_batch_norm=True,
    optimizer="adam",
    base_lr=2e-3,
    base_batch=STUDY_BATCH,
    lr_scaling="none",
    weight_decay=1e-5,
    schedule="cosine",
    warmup_epochs=0.0,
    settings=(LAMBD.at(5e-3),),
    sources={
        "*": "twinray's default, the study's settings (train/config.py PretrainConfig), not the paper's "
        "(8192-8192-8192, LARS 0.2 at batch 2048): today's behaviour stays the default",
        "coefficients": "lambd 5e-3: the paper, section 2",
    },
)
