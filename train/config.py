"""Run configurations, typed: PretrainConfig (train/pretrain.py) and FinetuneConfig (train/finetune.py).

Each holds the study's settings by default. Every field is a flag (`--batch-size`, `--no-compile`, ...);
`--config FILE.yaml` sets fields first, and flags win. train/scan.py builds the same objects from a scan's YAML
(`from_mapping`), so a bad value in a scan stops it before its first run, in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from twinray.cli import OneLineParser
from twinray.config import check_fields, read_mapping
from twinray.pipelines.cache import CACHES
from twinray.pipelines.loader import BACKENDS
from twinray.storage import location
from twinray.train.label_fractions import check_fraction
from twinray.train.labels import UNCERTAIN_POLICIES
from twinray.train.methods import METHODS, STUDY_BATCH
from twinray.train.model import BACKBONES, parse_projector
from twinray.train.step import COMPILE_MODES
from twinray.train.transfer import parse_mode

CHOICES = {
    "method": tuple(METHODS),
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


# The fields that only some methods have, and the methods that have them. A value set for another method is a
# ConfigError naming the flag and the method (PretrainConfig.validate), not silently ignored.
METHOD_ONLY = {
    "lambd": ("barlow",),
    "temperature": ("simclr", "moco"),
    "momentum": ("moco", "byol"),
    "queue_size": ("moco",),
    "key_bn_chunk": ("moco",),
    "predictor": ("byol",),
    "sim_coeff": ("vicreg",),
    "std_coeff": ("vicreg",),
    "cov_coeff": ("vicreg",),
}


def method_default(method: str, name: str, batch_size: int):
    """The default of a method-dependent field for `method` (train/methods.py METHODS), at `batch_size` images per
    step for the learning rate; None where the field does not apply to the method."""
    m = METHODS[method]
    if name in METHOD_ONLY and method not in METHOD_ONLY[name]:
        return None
    if name == "lr":
        return m.lr(batch_size)
    if name in m.coefficients:
        return m.coefficients[name]
    return getattr(m, name)


@dataclass
class PretrainConfig:
    """A pretraining run. The fields left None here default per `method` (train/methods.py METHODS, from the
    papers; barlow's are the study's settings): projector, optimizer, lr (at the run's --batch-size), weight_decay,
    schedule, warmup_epochs, and the method's own fields (METHOD_ONLY). They are filled when the object is made,
    so a YAML file or a flag overrides any of them."""

    data: str = "data/packed/covid"
    out: str = "runs/pretrain"
    method: str = "barlow"
    epochs: int = 300
    batch_size: int = 128
    size: int = 224
    backbone: str = "resnet18"
    channels: int = 1
    projector: str | None = None  # barlow: 512
    lambd: float | None = None  # barlow: 5e-3
    lr: float | None = None  # barlow: 2e-3
    weight_decay: float | None = None  # barlow: 1e-5
    optimizer: str | None = None  # barlow: adam
    exclude_bias_norm: bool = False  # Adam/AdamW: keep biases and BN out of weight decay (LARS always does)
    schedule: str | None = None  # barlow: cosine
    warmup_epochs: float | None = None  # barlow: 0
    temperature: float | None = None  # simclr 0.1, moco 0.2
    momentum: float | None = None  # moco 0.999 (constant), byol 0.996 (base of BYOL's cosine schedule)
    queue_size: int | None = None  # moco: 65536
    key_bn_chunk: int | None = None  # moco: 32 images per BatchNorm batch of the key encoder
    predictor: str | None = None  # byol: 4096-256
    sim_coeff: float | None = None  # vicreg: 25
    std_coeff: float | None = None  # vicreg: 25
    cov_coeff: float | None = None  # vicreg: 1
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

    def __post_init__(self):
        if self.method in METHODS:  # else validate() names the choices
            for name in METHOD_FIELDS:
                if getattr(self, name) is None:
                    setattr(self, name, self.default(name))

    def default(self, name: str):
        """This config's default for field `name`: its method's for the method-dependent fields."""
        if name in METHOD_FIELDS and self.method in METHODS:
            return method_default(self.method, name, self.batch_size)
        return next(f.default for f in fields(self) if f.name == name)

    def validate(self) -> PretrainConfig:
        check_choices(self, CHOICES, label=str)
        for name, methods in METHOD_ONLY.items():
            if self.method not in methods and getattr(self, name) is not None:
                raise ConfigError(
                    f"{flag(name)} does not apply to --method {self.method} (only to {', '.join(methods)})"
                )
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
        for name in ("lr", "lambd", "temperature", "queue_size", "key_bn_chunk"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("weight_decay and warmup_epochs must not be negative")
        for name in ("sim_coeff", "std_coeff", "cov_coeff"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.momentum is not None and not 0 <= self.momentum <= 1:
            raise ConfigError(f"momentum must be in [0, 1], got {self.momentum}")
        if self.queue_size is not None and self.queue_size < self.batch_size:
            raise ConfigError(
                f"queue_size {self.queue_size} must hold at least one global batch (--batch-size {self.batch_size})"
            )
        try:
            dims = parse_projector(self.projector)
            if self.predictor is not None and parse_projector(self.predictor)[-1] != dims[-1]:
                raise ValueError(f"predictor {self.predictor!r} must end with the projector's size {dims[-1]}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The fields whose default depends on the method (None in the class, filled per method by __post_init__).
METHOD_FIELDS = (
    "projector",
    "optimizer",
    "lr",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    *METHOD_ONLY,
)


# A pretraining re-run on an existing --out (train/pretrain.py, docs/pretrain.md). Every PretrainConfig field is in
# exactly one of PRETRAIN_LEARNED and PRETRAIN_RUNS (tests/test_rerun_pretrain.py checks it).
# LEARNED: the settings that change what is learned, or the figures logged about it (knn_k, knn_bank); "data" is
# compared by content (the manifest's digest), not by path. A resume must keep them, but for PRETRAIN_FREE and those
# named in --allow-change.
PRETRAIN_FIXED = (  # the checkpoint's tensors fit only these as they were: no flag changes them
    "data",
    "method",
    "backbone",
    "channels",
    "projector",
    "predictor",
    "optimizer",
    "exclude_bias_norm",
    "queue_size",
)
PRETRAIN_LEARNED = (
    *PRETRAIN_FIXED,
    "size",
    "batch_size",
    "recipe",
    "epochs",
    "lr",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "grad_accum",
    "seed",
    "mixed_precision",
    "lambd",
    "temperature",
    "momentum",
    "key_bn_chunk",
    "sim_coeff",
    "std_coeff",
    "cov_coeff",
    "knn_k",
    "knn_bank",
)
PRETRAIN_FREE = ("epochs", "lr")  # change on a resume without a flag (epochs only upwards), said at the start
# RUNS: how the run runs; a re-run may change any of them.
PRETRAIN_RUNS = (
    "out",
    "backend",
    "cache",
    "compile",
    "compile_mode",
    "wandb",
    "workers",
    "eval_every",
    "keep_checkpoints",
    "log_every",
    "deterministic",
    "max_steps",
    "shard_cache",
    "shard_cache_limit",
    "storage_options",
)


def parse_allow_change(text: str | None) -> tuple[str, ...]:
    """`--allow-change size,recipe` as field names. Raises ConfigError, one line, for a name that is not a
    PretrainConfig field, or one the checkpoint's tensors fix (PRETRAIN_FIXED)."""
    names = tuple(n.strip().replace("-", "_") for n in (text or "").split(",") if n.strip())
    for name in names:
        if name in PRETRAIN_FIXED:
            raise ConfigError(
                f"--allow-change {name}: a checkpoint continues only with the same {name}; "
                "use --force to start over, or another --out"
            )
        if name not in PRETRAIN_LEARNED and name not in PRETRAIN_RUNS:  # a PRETRAIN_RUNS one changes freely anyway
            allowed = ", ".join(n for n in PRETRAIN_LEARNED if n not in PRETRAIN_FIXED)
            raise ConfigError(f"--allow-change {name!r} is not a setting; the ones it may name: {allowed}")
    return names


def _method_help(name: str) -> str:
    values = [(m, method_default(m, name, STUDY_BATCH)) for m in METHODS]
    shown = ", ".join(f"{m} {v:g}" if isinstance(v, float) else f"{m} {v}" for m, v in values if v is not None)
    lr = f" at --batch-size {STUDY_BATCH} (linear in it but for barlow)" if name == "lr" else ""
    return f"per method{lr}: {shown}"


# --help shows each method's default of the method-dependent fields (train/config.py parser reads HELP).
PretrainConfig.HELP = {name: _method_help(name) for name in METHOD_FIELDS}


@dataclass
class FinetuneConfig:
    """Fine-tuning or a linear probe of one backbone on a packed dataset.

    The defaults are the study's downstream settings (report, section 3.4): Adam, lr 0.00153, weight decay
    9.87e-6, batch 96, 15 epochs, 224 px. `data`, `init` and `out` have no default and must be given."""

    PROG: ClassVar[str] = "train/finetune.py"
    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "init", "out")

    data: str | None = None
    init: str | None = None
    out: str | None = None
    mode: str = "full"
    fraction: float = 1.0
    seed: int = 0
    epochs: int = 15
    size: int = 224
    batch_size: int = 96
    lr: float = 0.00153
    weight_decay: float = 9.87e-6
    backbone: str = "resnet18"
    channels: int = 1
    backend: str = "native"
    labels: str | None = None
    uncertain: str = "ones"
    device: str | None = None
    workers: int | None = None
    cache: str = "auto"
    shard_cache: str | None = None
    shard_cache_limit: str | None = None
    storage_options: str | None = None
    force: bool = False

    HELP: ClassVar[dict] = {
        "data": "a packed dataset (python -m prep ...), or its URL",
        "init": "RUN_DIR, BACKBONE.safetensors, a fine-tuned run (its head matched by class name), imagenet or random",
        "out": "the run's directory; a run left there resumes, a finished one is kept",
        "mode": "full, linear or freeze:K (K = 0..4)",
        "fraction": "label fraction of the train split, in (0, 1]",
        "backbone": "for imagenet and random",
        "channels": "for imagenet and random: 1 or 3",
        "labels": "multilabel: comma-separated (default: the 5 competition ones)",
        "uncertain": "multilabel: what -1 means (ones, zeros, ignore)",
        "device": "cuda when there is one, else cpu",
        "workers": "CPU decode threads (native backend)",
        "cache": "native backend: keep the decoded train and val images in memory (auto: where they fit)",
        "shard_cache": "node-local cache for a --data URL",
        "shard_cache_limit": "shard cache size limit, e.g. 200GB",
        "storage_options": "fsspec options as JSON; credentials come from the environment",
        "force": "replace the run in --out (finished or not) instead of keeping or resuming it",
    }
    CHOICES: ClassVar[dict] = {
        "backbone": BACKBONES,
        "channels": (1, 3),
        "backend": BACKENDS,
        "uncertain": UNCERTAIN_POLICIES,
        "cache": CACHES,
    }

    def validate(self) -> FinetuneConfig:
        """Raises ConfigError naming the flag and its value; normalises `data` (a local path, or a URL as given)."""
        missing = [flag(name) for name in self.REQUIRED if getattr(self, name) in (None, "")]
        if missing:
            raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
        check_choices(self, self.CHOICES, label=flag)
        for name in ("epochs", "size", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} {getattr(self, name)} must be at least 1")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"--lr {self.lr} must be positive and --weight-decay {self.weight_decay} not negative")
        check_batch_size(self.batch_size)  # the head's BatchNorm trains on whole batches, in every mode
        try:
            check_fraction(self.fraction)
        except ValueError as e:
            raise ConfigError(f"--fraction: {e}") from None
        try:
            parse_mode(self.mode)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.data, self.out = str(location(str(self.data))), str(Path(self.out))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CONFIGS = (PretrainConfig, FinetuneConfig)


def check_choices(config, choices: dict, label) -> None:
    """Raises ConfigError, "{label(field)} 'value' is not one of: a, b", for the first field of `config` whose value
    is not among its `choices` ({field: allowed values})."""
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            valid = ", ".join(str(c) for c in allowed)
            raise ConfigError(f"{label(name)} {getattr(config, name)!r} is not one of: {valid}")


def flag(name: str) -> str:
    """batch_size -> --batch-size"""
    return "--" + name.replace("_", "-")


def to_flags(config, names=None) -> list[str]:
    """The command line that rebuilds `config`: ["--batch-size", "32", "--no-compile", ...]. `names`: the fields to
    write (train/scan.py passes those a scan sets, so each run's flags say what the scan chose); by default, every
    field that differs from the class's default."""
    out = []
    for f in fields(config):
        value = getattr(config, f.name)
        default = config.default(f.name) if hasattr(config, "default") else f.default
        if value is None or (f.name not in names if names is not None else value == default):
            continue
        if isinstance(value, bool):
            out.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        else:
            out += [flag(f.name), str(value)]
    return out


def _base_type(annotation) -> type:
    """int for 'int | None', bool for 'bool | None', ..."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(value, kind: type, name: str, where: str):
    """A YAML value as the field's type. YAML 1.1 reads `1e-3` as text and `512` as a number, so numbers written
    either way are taken; anything else raises ConfigError naming the field and the value."""
    if value is None or (isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)):
        return value
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind in (int, float) and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
            if kind is float:
                return number
            if number.is_integer():
                return int(number)
        except ValueError:
            pass
    words = {bool: "true or false", int: "an integer", float: "a number", str: "text"}[kind]
    raise ConfigError(f"{where}: {name} {value!r} is not {words}")


def typed_fields(cls, values: dict, where: str) -> dict:
    """A YAML mapping's fields for `cls`, keys with - or _, each value as its field's type; not yet validated.
    Raises ConfigError naming `where` for an unknown field or a value of the wrong type."""
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    check_fields(values, (f.name for f in fields(cls)), where, error=ConfigError)
    hints = typing.get_type_hints(cls)
    return {k: _coerce(v, _base_type(hints[k]), k, where) for k, v in values.items()}


def from_mapping(cls, values: dict, where: str):
    """A validated `cls` (PretrainConfig or FinetuneConfig) from a YAML mapping (typed_fields). Raises ConfigError
    in one line naming `where` for an unknown field, a value of the wrong type or a bad value."""
    typed = typed_fields(cls, values, where)
    try:
        return cls(**typed).validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_yaml(path: str | Path, cls=PretrainConfig) -> dict:
    """A config file's fields, checked for unknown names and types; not yet validated (flags may follow)."""
    return typed_fields(cls, read_mapping(path, "config", error=ConfigError), str(path))


def parser(cls=PretrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of `cls`, plus --config (and --resume for pretraining); no defaults, so that the flags
    given can be told from the YAML's fields."""
    hints = typing.get_type_hints(cls)
    default = (
        "Self-supervised pretraining (--method barlow, simclr, moco, byol or vicreg; Barlow Twins by default) on a "
        "packed chest X-ray dataset. The fields without a default shown take their method's (docs/methods.md)."
    )
    p = OneLineParser(
        prog=getattr(cls, "PROG", "train/pretrain.py"),
        description=description or (default if cls is PretrainConfig else cls.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of fields; flags override it")
    if cls is PretrainConfig:
        p.add_argument("--resume", action="store_true", help="continue the run in --out (also the default)")
        p.add_argument(
            "--allow-change",
            metavar="NAMES",
            help="resume although these settings differ from the checkpoint's (comma-separated field names)",
        )
        p.add_argument(
            "--force",
            action="store_true",
            help="discard the run in --out (checkpoints, metrics, config, backbone, wandb) and start over",
        )
    for f in fields(cls):
        kind = _base_type(hints[f.name])
        shown = "" if f.default is None else f" (default: {f.default})"
        text = (getattr(cls, "HELP", {}).get(f.name, "") + shown).strip() or None
        if kind is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag(f.name), type=kind, default=None, metavar=f.name.upper(), help=text)
    return p


def from_args(argv: list[str] | None = None, cls=PretrainConfig, description: str | None = None):
    """(validated config, the parsed namespace) from a command line; --config's fields first, flags on top."""
    args = parser(cls, description).parse_args(argv)
    values = load_yaml(args.config, cls) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None})
    return cls(**values).validate(), args
