"""What a method's module declares for the registry: `MethodSpec` (its defaults with their sources, its Method
class) and `Setting` (a config field of its own, such as MoCo's queue_size), with the checks those fields share.

Learning rates are given at the study's batch of 128 images (STUDY_BATCH), scaled from the paper's batch only with
the rule the paper (or its official code) states.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STUDY_BATCH = 128


@dataclass(frozen=True)
class Setting:
    """A PretrainConfig field that only some methods have (`--temperature`, `--queue-size`, ...). A method lists
    its own in MethodSpec.settings, each with its default (`at`); train/config.py adds one field per name, None for
    the other methods, where setting it is a ConfigError naming the flag and the methods that have it.

    name: the field's name (the flag is --name with hyphens); kind: float, int or str (the field is `kind | None`).
    help: its --help sentence (the defaults per method are added to it).
    check: `check(value, config)` raises ValueError, its message naming the field and the value, for a bad value of
        a validated config's method; None: any value of `kind`.
    fixed: the checkpoint's tensors fix it (a queue's size, a predictor's layers), so a resume cannot change it.
    row: its row's label in docs/methods.md's defaults table; None: shown among the loss coefficients.
    default: this method's default (set by `at`); note: a word shown after it in the table ('constant').
    """

    name: str
    kind: type
    help: str
    check: Callable[[Any, Any], None] | None = None
    fixed: bool = False
    row: str | None = None
    default: Any = None
    note: str | None = None

    def at(self, default, note: str | None = None) -> Setting:
        """This setting with a method's default (and the table's note)."""
        return dataclasses.replace(self, default=default, note=note)

    def declaration(self) -> Setting:
        """The setting without a method's default: what two methods sharing the field must agree on."""
        return dataclasses.replace(self, default=None, note=None)


def positive(name: str) -> Callable[[Any, Any], None]:
    """A check: the value must be finite and > 0 (NaN and inf are refused: the loss would be NaN or inf)."""

    def check(value, config) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number above 0, got {value}")

    return check


def non_negative(name: str) -> Callable[[Any, Any], None]:
    """A check: the value must be finite and >= 0 (NaN and inf are refused)."""

    def check(value, config) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of at least 0, got {value}")

    return check


def _unit_interval(value, config) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {value}")


# The fields more than one method has: each method gives its own default with `at`.
TEMPERATURE = Setting("temperature", float, "the InfoNCE temperature", positive("temperature"), row="temperature")
MOMENTUM = Setting(
    "momentum",
    float,
    "the key/target encoder's EMA momentum (moco constant; byol the base of its cosine schedule)",
    _unit_interval,
    row="momentum",
)


@dataclass(frozen=True)
class MethodSpec:
    """One self-supervised method as the registry (train/methods/__init__.py METHODS) holds it.

    key: the `--method` name, which is also its module's name (train/methods/<key>.py). name, paper: for the docs.
    method: its Method class (train/methods/base.py MethodBase): `from_config` builds it for a run and
        `model_pieces` names what it adds to the model.
    loss: its loss function (docs/methods.md names it and its file).
    pieces: the model pieces it adds, in words, for docs/methods.md.
    projector: the head's spec string (train/model.py's format, e.g. '2048-128': hidden 2048, output 128; sizes are
        the papers', which use a ResNet-50); projector_batch_norm: whether its hidden layers have BatchNorm
        (train/heads.py build_head).
    optimizer: a train/optim.py name; base_lr at base_batch images, scaled by lr_scaling ('linear': lr = base_lr *
        batch / base_batch; 'none': as it is) to `lr(batch)`; weight_decay; schedule; warmup_epochs.
    settings: its own config fields, each with its default (Setting.at).
    constants: the loss's other keyword constants, not config fields (VICReg's gamma and eps).
    sources: field name -> where the value comes from (paper section, table or official code); '*': all fields.
    """

    key: str
    name: str
    paper: str
    method: type
    loss: Callable
    pieces: str
    projector: str
    projector_batch_norm: bool
    optimizer: str
    base_lr: float
    base_batch: int
    lr_scaling: str
    weight_decay: float
    schedule: str
    warmup_epochs: float
    settings: tuple[Setting, ...] = ()
    constants: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def lr(self, batch: int = STUDY_BATCH) -> float:
        """The learning rate at `batch` images per step (all processes together)."""
        if self.lr_scaling == "linear":
            return self.base_lr * batch / self.base_batch
        return self.base_lr

    def setting(self, name: str) -> Setting | None:
        """Its own setting `name` (with its default), or None where the method has no such field."""
        return next((s for s in self.settings if s.name == name), None)

    @property
    def coefficients(self) -> dict[str, float]:
        """The loss's weights and constants by the loss function's keyword names: the settings shown among the
        coefficients (row None), then the constants."""
        return {**{s.name: s.default for s in self.settings if s.row is None}, **self.constants}
