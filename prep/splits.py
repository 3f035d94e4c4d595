"""Deterministic train/val/test splits: stratified by a key, and kept whole per patient when there is one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

from prep.errors import PrepError
from prep.format import SPLITS


def parse_split(spec: str, names: Sequence[str] = SPLITS) -> dict[str, float]:
    """'80/10/10' (percent, or fractions summing to 1) -> {'train': 0.8, 'val': 0.1, 'test': 0.1}."""
    parts = str(spec).replace(",", "/").split("/")
    bad = f"split {spec!r} is not {'/'.join(['N'] * len(names))} for {'/'.join(names)}"
    if len(parts) != len(names):
        raise PrepError(f"{bad} ({len(parts)} parts given)")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise PrepError(f"{bad} (not numbers)") from None
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise PrepError(f"{bad} (parts must be >= 0)")
    total = sum(values)
    if not (abs(total - 100) < 1e-6 or abs(total - 1) < 1e-9):
        raise PrepError(f"{bad} (parts sum to {total:g}, not 100)")
    if values[0] == 0:
        raise PrepError(f"{bad} (train must not be empty)")
    return {name: v / total for name, v in zip(names, values)}


def _allocate(n: int, fractions: dict[str, float]) -> list[str]:
    """n units -> split names with the largest-remainder method; leftovers go to train first."""
    exact = {name: n * f for name, f in fractions.items()}
    counts = {name: int(np.floor(x)) for name, x in exact.items()}
    by_remainder = sorted(fractions, key=lambda name: (-(exact[name] - counts[name]), list(fractions).index(name)))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return [name for name in fractions for _ in range(counts[name])]


def assign_splits(
    strata: Sequence[Hashable],
    fractions: dict[str, float],
    seed: int,
    groups: Sequence[Hashable | None] | None = None,
) -> list[str]:
    """Split name per item. Items sharing a group (patient) land together; each group takes the stratum of
    its first item. Within each stratum, units are shuffled with `seed` and cut by `fractions`."""
    n = len(strata)
    if groups is None:
        groups = [None] * n
    unit_of: list[Hashable] = [("item", i) if g is None else ("group", g) for i, g in enumerate(groups)]
    unit_stratum: dict[Hashable, Hashable] = {}
    for unit, stratum in zip(unit_of, strata):
        unit_stratum.setdefault(unit, stratum)
    by_stratum: dict[Hashable, list[Hashable]] = defaultdict(list)
    for unit, stratum in unit_stratum.items():
        by_stratum[stratum].append(unit)

    rng = np.random.default_rng(seed)
    unit_split: dict[Hashable, str] = {}
    for stratum in sorted(by_stratum, key=repr):  # a fixed order keeps the rng stream reproducible
        units = sorted(by_stratum[stratum], key=repr)
        order = rng.permutation(len(units))
        for unit_pos, split in zip(order, _allocate(len(units), fractions)):
            unit_split[units[unit_pos]] = split
    return [unit_split[unit] for unit in unit_of]
