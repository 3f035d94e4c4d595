"""Pretraining configuration: typed, the study's final settings by default, YAML or flags on top.

Every field is a flag (`--batch-size`, `--no-compile`, ...); `--config FILE.yaml` sets fields first, flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from twinray.pipelines.cache import CACHES
from twinray.train.model import BACKBONES, parse_projector
from twinray.train.step import COMPILE_MODES

from twinray.cli import OneLineParser
from twinray.config import check_fields, read_mapping

CHOICES = {
    "optimizer": ("adam", "adamw", "lars", "sgd"),
    "schedule": ("constant", "linear", "cosine"),
    "backend": ("native", "dali", "ffcv"),
    "cache": CACHES,
    "mixed_precision": ("auto", "no", "fp16", "bf16"),
    "wandb": ("online", "offline", "disabled"),
    "backbone": BACKBONES,
    "channels": (1, 3),
    "compile_mode": COMPILE_MODES,
}


class ConfigError(ValueError):
    """A bad value: the message names the field, the value and the valid choices."""


MIN_BATCH = 2  # images per process and step that BatchNorm can train on


def check_batch_size(batch_size: int, processes: int = 1) -> int:
    """The per-process batch of one training step: the global `batch_size` split evenly over `processes`
    (--grad-accum does not divide it: each accumulated step runs a whole per-process batch).

    Raises ConfigError, naming --batch-size, when it does not split evenly or leaves a process fewer than 2 images:
    BatchNorm in training mode standardises each feature over the process's batch, and one image has no spread
    (PyTorch: "Expected more than 1 value per channel when training"); so does the Barlow Twins loss."""
    if processes > 1 and batch_size % processes:
        raise ConfigError(f"--batch-size {batch_size} does not split evenly over {processes} processes")
    per_process = batch_size // processes
    if per_process < MIN_BATCH:
        split = f" over {processes} processes leaves {per_process} per process" if processes > 1 else ""
        raise ConfigError(
            f"--batch-size {batch_size}{split}: training needs at least {MIN_BATCH} images per process and step "
            "(BatchNorm standardises over the batch)"
        )
    return per_process


@dataclass
class PretrainConfig:
    data: str = "data/packed/covid"
    out: str = "runs/pretrain"
    epochs: int = 300
    batch_size: int = 128
    size: int = 224
    backbone: str = "resnet18"
    channels: int = 1
    projector: str = "512"
    lambd: float = 5e-3
    lr: float = 2e-3
    weight_decay: float = 1e-5
    optimizer: str = "adam"
    exclude_bias_norm: bool = False  # Adam/AdamW: keep biases and BN out of weight decay (LARS always does)
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    recipe: str = "seed-final"
    backend: str = "native"
    cache: str = "auto"  # native backend: the split decoded once and kept in memory (pipelines/cache.py)
    compile: bool | None = None  # None: on with CUDA, off on the CPU where it does not pay
    compile_mode: str = "default"  # the CUDA default stays until a GPU measurement of the modes says otherwise
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, no on the CPU
    grad_accum: int = 1
    wandb: str = "offline"
    seed: int = 0
    workers: int | None = None
    # Each kNN evaluation re-extracts its bank's features (a forward pass over up to knn_bank train images, plus
    # their loading), so not every epoch; the linear probe reports every step anyway. The last epoch always is.
    eval_every: int = 10  # epochs between kNN evaluations
    knn_k: int = 20
    knn_bank: int = 20000  # train images kNN compares against: a fixed random subset of larger splits (CheXpert)
    keep_checkpoints: int = 2
    log_every: int = 10  # steps between metrics.jsonl lines
    deterministic: bool = False
    max_steps: int | None = None  # stop after this many steps in all (tests, smoke runs)
    # A --data URL is read through a node-local shard cache (prep/shard_cache.py); credentials come from the
    # environment, never from these (storage_options is recorded in config.json: endpoints, not secrets).
    shard_cache: str | None = None  # default: $TWINRAY_SHARD_CACHE, else ~/.cache/twinray/shards
    shard_cache_limit: str | None = None  # e.g. 200GB; least recently used shards are deleted past it
    storage_options: str | None = None  # fsspec options as JSON, e.g. {"client_kwargs": {"endpoint_url": ...}}

    def validate(self) -> PretrainConfig:
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                valid = ", ".join(str(c) for c in choices)
                raise ConfigError(f"{name} {getattr(self, name)!r} is not one of: {valid}")
        check_batch_size(self.batch_size)  # per process, once the world size is known: train/pretrain.py
        for name in (
            "epochs",
            "size",
            "grad_accum",
            "knn_k",
            "knn_bank",
            "keep_checkpoints",
            "log_every",
            "eval_every",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "lambd"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("weight_decay and warmup_epochs must not be negative")
        try:
            parse_projector(self.projector)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _base_type(annotation) -> type:
    """int for 'int | None', bool for 'bool | None', ..."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def load_yaml(path: str | Path) -> dict:
    data = read_mapping(path, "config", error=ConfigError)
    check_fields(data, (f.name for f in fields(PretrainConfig)), str(path), error=ConfigError)
    return data


def parser() -> argparse.ArgumentParser:
    hints = typing.get_type_hints(PretrainConfig)
    p = OneLineParser(prog="train/pretrain.py", description="Barlow Twins pretraining on a packed chest X-ray dataset.")
    p.add_argument("--config", help="YAML file of fields; flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (also the default)")
    for f in fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=kind, default=None, metavar=f.name.upper())
    return p


def from_args(argv: list[str] | None = None) -> tuple[PretrainConfig, argparse.Namespace]:
    args = parser().parse_args(argv)
    values = load_yaml(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in fields(PretrainConfig) if getattr(args, f.name) is not None})
    return PretrainConfig(**values).validate(), args
