"""Run configurations, typed: PretrainConfig (train/pretrain.py) and FinetuneConfig (train/finetune.py).

Each holds the study's settings by default. Every field is a flag (`--batch-size`, `--no-compile`, ...);
`--config FILE.yaml` sets fields first, and flags win. train/scan.py builds the same objects from a scan's YAML
(`from_mapping`), so a bad value in a scan stops it before its first run, in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from twinray.cli import OneLineParser
from twinray.config import check_fields, read_mapping
from twinray.pipelines.augment.recipes import RECIPES, TOKENS
from twinray.pipelines.cache import CACHES
from twinray.pipelines.loader import BACKENDS
from twinray.storage import location
from twinray.train.label_fractions import check_fraction
from twinray.train.labels import UNCERTAIN_POLICIES
from twinray.train.methods import METHOD_ONLY, METHODS, SETTINGS, STUDY_BATCH
from twinray.train.model import BACKBONES, OUTPUT_STRIDES, parse_projector
from twinray.train.runlog import parse_report_to
from twinray.train.step import COMPILE_MODES
from twinray.train.transfer import parse_mode
from twinray.usage import examples, program

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
    "output_stride": OUTPUT_STRIDES,
    "compile_mode": COMPILE_MODES,
}


LIMIT_SHOWN = "$TWINRAY_SHARD_CACHE_LIMIT, else no limit"


def setting(default, help: str, shown: str | None = None):
    """A config field with its --help sentence; `shown`: how --help states the default where the value itself does
    not say it (None: "the CPUs there are"). field_help adds the default and the choices; a field without a
    sentence is refused there, so none goes undocumented."""
    metadata = {"help": help} if shown is None else {"help": help, "shown": shown}
    return field(default=default, metadata=metadata)


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


def method_default(method: str, name: str, batch_size: int):
    """The default of a method-dependent field for `method` (train/methods/ METHODS), at `batch_size` images per
    step for the learning rate; None where the field does not apply to the method."""
    m = METHODS[method]
    if name in METHOD_ONLY:
        return m.setting(name).default if method in METHOD_ONLY[name] else None
    if name == "lr":
        return m.lr(batch_size)
    return getattr(m, name)


def method_settings(after: str):
    """A class decorator, before @dataclass: one field per method setting (train/methods/ SETTINGS, in registry
    order), `kind | None = None` with its help, inserted after the field `after`. So a method's own fields are
    declared in its module only. Raises TypeError for a setting named like one of the class's own fields (it
    would replace that field for every method)."""

    def insert(cls):
        for name in SETTINGS:
            if name in cls.__dict__["__annotations__"]:
                raise TypeError(
                    f"the setting {name} of {', '.join(METHOD_ONLY[name])} is named like {cls.__name__}'s field "
                    f"{name}: give it another name"
                )
        annotations = {}
        for name, hint in cls.__dict__["__annotations__"].items():
            annotations[name] = hint
            if name == after:
                for s in SETTINGS.values():
                    annotations[s.name] = f"{s.kind.__name__} | None"
                    setattr(cls, s.name, setting(None, s.help))
        cls.__annotations__ = annotations
        return cls

    return insert


@dataclass
@method_settings(after="warmup_epochs")
class PretrainConfig:
    """A pretraining run. The fields left None here default per `method` (train/methods/ METHODS, from the
    papers; barlow's are the study's settings): projector, optimizer, lr (at the run's --batch-size), weight_decay,
    schedule, warmup_epochs, and the methods' own fields (train/methods/ SETTINGS, added after warmup_epochs by
    `method_settings`; METHOD_ONLY says which method has which). They are filled when the object is made, so a
    YAML file or a flag overrides any of them."""

    COMMAND: ClassVar[str] = "pretrain"  # the usage line's program: twinray pretrain (twinray/usage.py)
    MODULE: ClassVar[str] = "twinray.train.pretrain"
    EXAMPLES: ClassVar[tuple[str, ...]] = (
        "--method byol --batch-size 256 --print-config > byol.yaml",
        "--config byol.yaml --data data/packed/covid --out runs/byol",
    )

    data: str = setting("data/packed/covid", "the packed dataset (twinray prep ...), a local folder or a URL")
    out: str = setting("runs/pretrain", "the run's directory: checkpoints, metrics.jsonl, config.json, the backbone")
    method: str = setting("barlow", "the self-supervised method; it sets the defaults of the fields shown per method")
    epochs: int = setting(300, "passes over the train split")
    batch_size: int = setting(128, "images per optimizer step, over all processes (the lr defaults scale with it)")
    size: int = setting(224, "the side of the square views, in pixels")
    backbone: str = setting("resnet18", "the encoder whose weights the run exports (backbone.safetensors)")
    channels: int = setting(1, "input channels: 1 (grey) or 3 (the grey image repeated, for RGB backbones)")
    output_stride: int = setting(
        32,
        "the input side over the last feature map's: 32 as published; 16 or 8 dilate the last stage or two "
        "instead of striding (timm's output_stride), so a 64-px view keeps a 4 x 4 or 8 x 8 map, at more compute",
    )
    init: str | None = setting(
        None,
        "the backbone's starting weights: a pretraining run, a backbone or timm .safetensors file, a fine-tuned "
        "model, or imagenet (timm's weights from the local Hugging Face cache); an RGB stem is summed into one "
        "channel, and the projector starts fresh (docs/pretrain.md, 'Continued pretraining')",
        shown="random weights",
    )
    projector: str | None = setting(None, "the projector's layer sizes, e.g. 512 or 2048-128")
    lr: float | None = setting(None, "the peak learning rate")
    weight_decay: float | None = setting(None, "the optimizer's weight decay")
    optimizer: str | None = setting(None, "the optimizer")
    exclude_bias_norm: bool = setting(
        False, "Adam/AdamW: keep biases and BatchNorm out of weight decay (LARS always does)"
    )
    schedule: str | None = setting(None, "the learning-rate schedule after warm-up")
    warmup_epochs: float | None = setting(None, "epochs of linear warm-up from 0 to --lr")
    recipe: str = setting(
        "seed-final",
        f"the augmentation recipe: a named one ({', '.join(RECIPES)}), base+OP+... (OP: {', '.join(TOKENS)}) or a "
        ".yaml file (docs/augmentation.md)",
    )
    backend: str = setting("native", "the data loader (dali and ffcv need their extras)")
    cache: str = setting(
        "auto", "native backend: the split decoded once and kept in memory (auto: device or host where it fits)"
    )
    compile: bool | None = setting(None, "torch.compile the training step", shown="on with CUDA, off on the CPU")
    compile_mode: str = setting("default", "torch.compile's mode")
    mixed_precision: str = setting("auto", "autocast dtype (auto: bf16 on CUDA, no on the CPU)")
    grad_accum: int = setting(1, "batches accumulated per optimizer step")
    wandb: str = setting(
        "offline", "Weights & Biases mode when --report-to has wandb (online needs WANDB_API_KEY; disabled drops it)"
    )
    report_to: str = setting(
        "wandb", "trackers to log to, comma-separated: wandb, tensorboard, mlflow, or none (docs/pretrain.md)"
    )
    seed: int = setting(0, "seeds the weights, the augmentations and the data order")
    workers: int | None = setting(None, "CPU decode threads", shown="the CPUs this process may use")
    # Each kNN evaluation re-extracts its bank's features (a forward pass over up to knn_bank train images, plus
    # their loading), so not every epoch; the linear probe reports every step anyway. The last epoch always is.
    eval_every: int = setting(10, "epochs between kNN evaluations (the last epoch always has one)")
    knn_k: int = setting(20, "neighbours of the kNN evaluation")
    knn_bank: int = setting(20000, "train images kNN compares against: a fixed random subset of larger splits")
    eval_data: str | None = setting(
        None,
        "a second, labelled packed dataset for the kNN and the online probe: its train split is the kNN bank and the "
        "probe's side stream, its val split the kNN's score (pretrain on unlabeled data, watch another set's classes)",
        shown="--data's own labels; none for unlabeled --data",
    )
    probe_batch: int = setting(32, "--eval-data: images per step of the probe's side stream, over all processes")
    keep_checkpoints: int = setting(2, "checkpoints kept in --out; older ones are deleted")
    log_every: int = setting(10, "steps between metrics.jsonl lines")
    deterministic: bool = setting(False, "deterministic kernels: reproducible to the bit, slower")
    max_steps: int | None = setting(None, "stop after this many steps in all (tests, smoke runs)", shown="no limit")
    # A --data URL is read through a node-local shard cache (prep/shard_cache.py); credentials come from the
    # environment, never from these (storage_options is recorded in config.json: endpoints, not secrets).
    shard_cache: str | None = setting(
        None, "node-local cache for a --data URL", shown="$TWINRAY_SHARD_CACHE, else ~/.cache/twinray/shards"
    )
    shard_cache_limit: str | None = setting(
        None, "shard cache size limit, e.g. 200GB; least recently used shards are deleted past it", LIMIT_SHOWN
    )
    storage_options: str | None = setting(
        None, 'fsspec options as JSON, e.g. {"client_kwargs": {"endpoint_url": ...}}; no credentials (the environment)'
    )

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
        if self.eval_data is not None:
            self.eval_data = str(location(str(self.eval_data)))
        try:
            parse_report_to(self.report_to)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in (
            "epochs",
            "size",
            "grad_accum",
            "knn_k",
            "knn_bank",
            "keep_checkpoints",
            "log_every",
            "eval_every",
            "probe_batch",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number above 0, got {self.lr}")
        for name in ("weight_decay", "warmup_epochs"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be a finite number of at least 0, got {getattr(self, name)}")
        try:
            parse_projector(self.projector)
            for s in SETTINGS.values():  # the method's own fields (the others are None here): their checks
                if s.check is not None and getattr(self, s.name) is not None:
                    s.check(getattr(self, s.name), self)
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
# LEARNED: the settings that change what is learned, or the figures logged about it (knn_k, knn_bank, eval_data,
# probe_batch); "data" and "eval_data" are compared by content (the manifest's digest), not by path. A resume must
# keep them, but for PRETRAIN_FREE and those named in --allow-change (a changed eval_data restarts the probe).
PRETRAIN_FIXED = (  # the checkpoint's tensors fit only these as they were: no flag changes them
    "data",
    "init",  # where the backbone started: by the sha256 of its weights
    "method",
    "backbone",
    "channels",
    "output_stride",
    "projector",
    "optimizer",
    "exclude_bias_norm",
    *(name for name, s in SETTINGS.items() if s.fixed),  # a queue's size, a predictor's layers
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
    *(name for name, s in SETTINGS.items() if not s.fixed),  # the methods' own, but for PRETRAIN_FIXED's
    "knn_k",
    "knn_bank",
    "eval_data",
    "probe_batch",
)
# The learned settings compared by content, not path: each part records the path and its manifest's digest.
PRETRAIN_BY_DIGEST = {"data": "data_digest", "eval_data": "eval_data_digest", "init": "init_digest"}
PRETRAIN_FREE = ("epochs", "lr")  # change on a resume without a flag (epochs only upwards), said at the start
# RUNS: how the run runs; a re-run may change any of them.
PRETRAIN_RUNS = (
    "out",
    "backend",
    "cache",
    "compile",
    "compile_mode",
    "wandb",
    "report_to",
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
    fixed = ", ".join(m for m, spec in METHODS.items() if spec.lr_scaling != "linear")
    lr = f" at --batch-size {STUDY_BATCH} (linear in it{' but for ' + fixed if fixed else ''})" if name == "lr" else ""
    return f"per method{lr}: {shown}"


@dataclass
class FinetuneConfig:
    """Fine-tuning or a linear probe of one backbone on a packed dataset.

    The defaults are the study's downstream settings (report, section 3.4): Adam, lr 0.00153, weight decay
    9.87e-6, batch 96, 15 epochs, 224 px. `data`, `init` and `out` have no default and must be given."""

    COMMAND: ClassVar[str] = "finetune"  # the usage line's program: twinray finetune (twinray/usage.py)
    MODULE: ClassVar[str] = "twinray.train.finetune"
    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "init", "out")
    EXAMPLES: ClassVar[tuple[str, ...]] = (
        "--data data/packed/covid --init runs/byol --out runs/ft-10 --fraction 0.1",
        "--data data/packed/covid --init imagenet --out runs/probe --mode linear --print-config > probe.yaml",
    )

    data: str | None = setting(None, "a packed dataset (twinray prep ...), or its URL")
    init: str | None = setting(
        None, "RUN_DIR, BACKBONE.safetensors, a fine-tuned run (its head matched by class name), imagenet or random"
    )
    out: str | None = setting(None, "the run's directory; a run left there resumes, a finished one is kept")
    mode: str = setting(
        "full", "full, linear (the backbone frozen) or freeze:K (the stem and layer1..layerK frozen, K = 0..4)"
    )
    fraction: float = setting(1.0, "label fraction of the train split, in (0, 1]")
    seed: int = setting(0, "seeds the head, the label fraction's draw and the data order")
    epochs: int = setting(15, "passes over the (fraction of the) train split")
    size: int = setting(224, "the side of the square input, in pixels")
    batch_size: int = setting(96, "images per optimizer step")
    lr: float = setting(0.00153, "Adam's learning rate")
    weight_decay: float = setting(9.87e-6, "Adam's weight decay")
    backbone: str = setting("resnet18", "the encoder for imagenet and random (a run or file brings its own)")
    channels: int = setting(1, "input channels for imagenet and random")
    output_stride: int = setting(
        32, "the backbone's output stride for imagenet and random (a run or file brings its own)"
    )
    backend: str = setting("native", "the data loader (dali and ffcv need their extras)")
    labels: str | None = setting(
        None, "multilabel: comma-separated label names", shown="the 5 CheXpert competition ones"
    )
    uncertain: str = setting("ones", "multilabel: what an uncertain label (-1) counts as")
    device: str | None = setting(None, "the torch device", shown="cuda when there is one, else cpu")
    workers: int | None = setting(None, "CPU decode threads, native backend", shown="the CPUs this process may use")
    cache: str = setting(
        "auto", "native backend: keep the decoded train and val images in memory (auto: where they fit)"
    )
    shard_cache: str | None = setting(
        None, "node-local cache for a --data URL", shown="$TWINRAY_SHARD_CACHE, else ~/.cache/twinray/shards"
    )
    shard_cache_limit: str | None = setting(None, "shard cache size limit, e.g. 200GB", LIMIT_SHOWN)
    storage_options: str | None = setting(None, "fsspec options as JSON; credentials come from the environment")
    force: bool = setting(False, "replace the run in --out (finished or not) instead of keeping or resuming it")

    CHOICES: ClassVar[dict] = {
        "backbone": BACKBONES,
        "channels": (1, 3),
        "output_stride": OUTPUT_STRIDES,
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
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(
                f"--lr {self.lr} must be a finite number above 0 and --weight-decay {self.weight_decay} finite and "
                "not negative"
            )
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


def field_help(cls, f: dataclasses.Field) -> str:
    """Field `f`'s --help text: its sentence, then its default (each method's, for PretrainConfig's method-dependent
    fields; "required" for FinetuneConfig's data, init and out) and its choices. Raises TypeError for a field
    declared without a sentence (`setting(default, help)`), so that none goes undocumented."""
    sentence = f.metadata.get("help", "").strip()
    if not sentence:
        raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it as setting(default, 'its sentence')")
    if cls is PretrainConfig and f.name in METHOD_FIELDS:
        default = "default " + _method_help(f.name)
    elif f.name in getattr(cls, "REQUIRED", ()):
        default = "required"
    else:
        default = f"default: {f.metadata.get('shown', 'none' if f.default is None else f.default)}"
    allowed = (CHOICES if cls is PretrainConfig else getattr(cls, "CHOICES", {})).get(f.name)
    choices = f"; choices: {', '.join(str(c) for c in allowed)}" if allowed else ""
    return f"{sentence} ({default}{choices})"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, with the description and epilog kept as written and flag names (--batch-size) never broken at
    their hyphens when a sentence wraps."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def parser(cls=PretrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of `cls`, each with its sentence, default and choices (field_help), plus --config and
    --print-config (and --resume, --allow-change, --force for pretraining); no defaults, so that the flags given can
    be told from the YAML's fields. The usage line and the examples name the tool as it was started
    (twinray/usage.py). Raises TypeError for a field without help metadata."""
    hints = typing.get_type_hints(cls)
    *others, last = METHODS
    first = METHODS[PretrainConfig.method].name
    default = (
        f"Self-supervised pretraining (--method {', '.join(others)} or {last}; {first} by default) on a "
        "packed chest X-ray dataset. The fields without a default shown take their method's (docs/methods.md)."
    )
    prog = program(cls.COMMAND, cls.MODULE)
    p = OneLineParser(
        prog=prog,
        description=description or (default if cls is PretrainConfig else cls.__doc__),
        epilog=examples(prog, *cls.EXAMPLES),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML file of fields (as --print-config writes); flags override it")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (--config, flags, defaults filled in) as YAML for --config, and exit",
    )
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
            help="discard what a pretraining wrote in --out (checkpoints, config.json, metrics.jsonl, "
            "train.log, curves.png, the backbone, wandb/, tensorboard/, mlruns/) and start over; other files stay",
        )
    for f in fields(cls):
        kind = _base_type(hints[f.name])
        text = field_help(cls, f).replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag(f.name), type=kind, default=None, metavar=f.name.upper(), help=text)
    return p


def to_yaml(config) -> str:
    """`config`'s every field as YAML that --config (load_yaml) reads back into an equal config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def from_args(argv: list[str] | None = None, cls=PretrainConfig, description: str | None = None):
    """(validated config, the parsed namespace) from a command line; --config's fields first, flags on top.

    With --print-config, writes the validated config to stdout (to_yaml) and raises SystemExit(0), as --help
    does: nothing is read from or written to --out. Raises ConfigError for a bad value or file."""
    args = parser(cls, description).parse_args(argv)
    values = load_yaml(args.config, cls) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None})
    config = cls(**values).validate()
    if args.print_config:
        sys.stdout.write(to_yaml(config))
        sys.stdout.flush()
        raise SystemExit(0)
    return config, args
