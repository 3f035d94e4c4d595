"""MoCo v2 (He et al. 2020, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297): InfoNCE of the online queries
against the momentum encoder's keys and a queue of earlier keys, with the papers' defaults."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from twinray.train.losses.moco import info_nce_loss
from twinray.train.methods.base import MethodBase, UpdateWatch, unwrap
from twinray.train.methods.spec import MOMENTUM, TEMPERATURE, MethodSpec, Setting, positive
from twinray.train.momentum import shuffled_forward
from twinray.train.step import StepOutput


class MoCoMethod(MethodBase):
    """MoCo v2, in the order of MoCo's Algorithm 1: queries of the first view from the online model, keys of the
    second view from the momentum encoder (`model.target`) with shuffled BatchNorm over chunks of `key_bn_chunk`
    images (train/momentum.py shuffled_forward, whose permutation comes from torch's global generator, which
    checkpoints hold), InfoNCE against `model.queue` at `temperature`, then the keys enqueued. After each optimizer
    update, the key encoder takes one EMA step at the constant `momentum`."""

    name = "moco"

    def __init__(self, temperature: float = 0.2, momentum: float = 0.999, key_bn_chunk: int = 32):
        self.temperature, self.momentum, self.key_bn_chunk = temperature, momentum, key_bn_chunk
        self.watch = UpdateWatch()

    @classmethod
    def from_config(cls, cfg, schedule, total_updates: int) -> MoCoMethod:
        return cls(cfg.temperature, cfg.momentum, cfg.key_bn_chunk)

    @classmethod
    def model_pieces(cls, cfg) -> dict:
        """A momentum encoder (the key encoder) and the queue of `cfg.queue_size` keys."""
        return {"momentum_encoder": True, "queue_size": cfg.queue_size}

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


def _queue_check(value, cfg) -> None:
    positive("queue_size")(value, cfg)
    if value < cfg.batch_size:
        raise ValueError(f"queue_size {value} must hold at least one global batch (--batch-size {cfg.batch_size})")


QUEUE_SIZE = Setting(
    "queue_size", int, "MoCo's queue of negative keys, at least one --batch-size", _queue_check, fixed=True, row="queue"
)
KEY_BN_CHUNK = Setting(
    "key_bn_chunk",
    int,
    "MoCo: images per BatchNorm batch of the key encoder (shuffled BN)",
    positive("key_bn_chunk"),
    row="key BN chunk",
)

SPEC = MethodSpec(
    key="moco",
    name="MoCo v2",
    paper="He et al. 2020, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297",
    method=MoCoMethod,
    loss=info_nce_loss,
    pieces="head without BN, `MomentumEncoder`, `KeyQueue`, `shuffled_forward` (train/momentum.py)",
    projector="2048-128",
    projector_batch_norm=False,
    optimizer="sgd",
    base_lr=0.03,
    base_batch=256,
    lr_scaling="linear",
    weight_decay=1e-4,
    schedule="cosine",
    warmup_epochs=0.0,
    settings=(TEMPERATURE.at(0.2), MOMENTUM.at(0.999, "constant"), QUEUE_SIZE.at(65536), KEY_BN_CHUNK.at(32)),
    sources={
        "projector": "MoCo v2 section 2: a 2-layer MLP head (hidden 2048, ReLU) on a 128-d output (MoCo "
        "section 4.1); the official code's head has biases and no BatchNorm",
        "temperature": "MoCo v2 section 2 and Table 1: tau = 0.2 with the MLP head",
        "momentum": "MoCo section 4.1 and Table 4: m = 0.999, constant",
        "queue_size": "MoCo section 4.1: K = 65536",
        "key_bn_chunk": "MoCo section 3.3: shuffled BN over 8 GPUs, 32 images each (batch 256)",
        "optimizer": "MoCo section 4.1: SGD, momentum 0.9, weight decay 1e-4, lr 0.03 at batch 256; MoCo v2: "
        "cosine schedule; official README (facebookresearch/moco): lr 0.015 at batch 128 (linear rule)",
    },
)
