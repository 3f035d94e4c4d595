"""SimCLR (Chen et al. 2020, arXiv:2002.05709): NT-Xent over the global batch, with the paper's defaults."""

from __future__ import annotations

import torch

from twinray.train.losses.simclr import nt_xent_loss
from twinray.train.methods.base import TwoViewMethod
from twinray.train.methods.spec import TEMPERATURE, MethodSpec


class SimCLRMethod(TwoViewMethod):
    """SimCLR: NT-Xent (train/losses/simclr.py) of the two views' projections at `temperature`."""

    name = "simclr"

    def __init__(self, temperature: float = 0.1):
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg, schedule, total_updates: int) -> SimCLRMethod:
        return cls(cfg.temperature)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor):
        return nt_xent_loss(z1, z2, self.temperature)


SPEC = MethodSpec(
    key="simclr",
    name="SimCLR",
    paper="Chen et al. 2020, arXiv:2002.05709",
    method=SimCLRMethod,
    loss=nt_xent_loss,
    pieces="projector (train/heads.py `build_head`)",
    projector="2048-128",
    projector_batch_norm=True,
    optimizer="lars",
    base_lr=0.3,
    base_batch=256,
    lr_scaling="linear",
    weight_decay=1e-6,
    schedule="cosine",
    warmup_epochs=10.0,
    settings=(TEMPERATURE.at(0.1),),
    sources={
        "projector": "section 2.1 and the default setting (section 2.3): one hidden layer as wide as the "
        "ResNet-50 features (2048), ReLU, 128-d output",
        "projector_batch_norm": "official code (google-research/simclr): BatchNorm in the head's layers",
        "temperature": "Table 5 (tau = 0.1 best at batch 4096) and the official code's default",
        "optimizer": "section 2.3: LARS, lr = 0.3 x BatchSize/256 (linear rule), weight decay 1e-6, 10 warm-up "
        "epochs then cosine decay. Appendix B.1 also gives 0.075 x sqrt(BatchSize) for small batches (0.85 at "
        "128); not the default here",
    },
)
