"""Optimisers and learning-rate schedules for pretraining."""

from __future__ import annotations

import math

import torch
from timm.optim import Lars
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_norm: bool) -> list[dict]:
    """Biases and norm parameters (the 1-D ones) apart: no weight decay, and for LARS no adaptation, as in the
    Barlow Twins paper."""
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if exclude_bias_norm and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, exclude_bias_norm: bool = False):
    if name == "lars":
        # timm's LARS adapts only groups with weight decay: the excluded group gets neither decay nor adaptation.
        return Lars(param_groups(model, weight_decay, True), lr=lr, momentum=0.9)
    groups = param_groups(model, weight_decay, exclude_bias_norm)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"optimizer {name!r} is not one of adam, adamw, lars, sgd")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at `step`: linear warm-up, then constant, linear decay or cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, schedule))
