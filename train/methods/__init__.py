"""The registry of self-supervised methods: `--method NAME` -> its MethodSpec (after solo-learn's
solo/methods/__init__.py METHODS).

Each method lives in one module, train/methods/<name>.py, which holds its Method class (forward, loss, what runs
after each update), its defaults with their sources, its own config fields (train/methods/spec.py Setting) and the
model pieces it adds; its loss is imported from train/losses/<name>.py. Everything else is derived from this
registry: PretrainConfig's method fields, their checks and --help (train/config.py), the `--method` choices,
docs/methods.md's tables (train/methods/table.py), the method a run trains (`build_method`) and the model it builds
(`model_pieces`). Registering a method is one line: its module's name in NAMES (docs/methods.md, "Adding a
method").
"""

from __future__ import annotations

import importlib

from twinray.train.methods.base import MethodBase
from twinray.train.methods.spec import STUDY_BATCH, MethodSpec, Setting

__all__ = ["METHODS", "METHOD_ONLY", "NAMES", "SETTINGS", "STUDY_BATCH", "build_method", "model_pieces"]

NAMES = ("barlow", "simclr", "moco", "byol", "vicreg")  # the --method choices, in the docs' order


def _register(names: tuple[str, ...]) -> dict[str, MethodSpec]:
    """Each name's module's SPEC. Raises TypeError for a module whose SPEC is not a MethodSpec keyed by the
    module's name, or whose method class is not a MethodBase."""
    specs = {}
    for name in names:
        spec = getattr(importlib.import_module(f"{__name__}.{name}"), "SPEC", None)
        if not isinstance(spec, MethodSpec) or spec.key != name:
            raise TypeError(f"train/methods/{name}.py must define SPEC = MethodSpec(key={name!r}, ...)")
        if not (isinstance(spec.method, type) and issubclass(spec.method, MethodBase)):
            raise TypeError(f"train/methods/{name}.py: SPEC.method must be a MethodBase subclass: {spec.method!r}")
        specs[name] = spec
    return specs


def _settings(specs: dict[str, MethodSpec]) -> tuple[dict[str, Setting], dict[str, tuple[str, ...]]]:
    """Every method's own settings by name (without a method's default), in registry order, and the methods that
    have each. Raises TypeError where two methods declare one name differently (its type, help or check), where a
    method lists one name twice, or where a setting has no default (Setting.at)."""
    settings: dict[str, Setting] = {}
    owners: dict[str, tuple[str, ...]] = {}
    for key, spec in specs.items():
        names = [s.name for s in spec.settings]
        if len(set(names)) < len(names):
            raise TypeError(f"{key} lists the setting {next(n for n in names if names.count(n) > 1)} twice")
        for s in spec.settings:
            if s.default is None:
                raise TypeError(f"{key}'s setting {s.name} has no default: give it one with .at(value)")
            declared = settings.setdefault(s.name, s.declaration())
            if declared != s.declaration():
                raise TypeError(f"{key} declares the setting {s.name} unlike {owners[s.name][0]} does")
            owners[s.name] = (*owners.get(s.name, ()), key)
    return settings, owners


METHODS: dict[str, MethodSpec] = _register(NAMES)
# SETTINGS: the fields only some methods have; METHOD_ONLY: the methods that have each (a value set for another
# method is a ConfigError naming the flag and these methods: train/config.py PretrainConfig.validate).
SETTINGS, METHOD_ONLY = _settings(METHODS)


def build_method(cfg, schedule, total_updates: int) -> MethodBase:
    """The Method of a validated PretrainConfig, with its fields: `schedule` is the run's lr scheduler and
    `total_updates` the optimizer updates of the whole run (BYOL's momentum schedule)."""
    return METHODS[cfg.method].method.from_config(cfg, schedule, total_updates)


def model_pieces(cfg) -> dict:
    """PretrainModel's keyword arguments for a validated config (train/model.py): the projector with BatchNorm or
    not (its method's), and the pieces its method adds (a predictor, a momentum encoder, a queue); none else."""
    spec = METHODS[cfg.method]
    none = {"predictor": None, "momentum_encoder": False, "queue_size": None}
    return {"projector_batch_norm": spec.projector_batch_norm, **none, **spec.method.model_pieces(cfg)}
