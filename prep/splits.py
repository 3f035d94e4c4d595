"""Deterministic train/val/test splits: stratified by a key, and kept whole per patient when there is one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np
from twinray.prep.format import SPLITS

from twinray.cli import InputError


def parse_split(spec: str, names: Sequence[str] = SPLITS) -> dict[str, float]:
    """'80/10/10' (percent, or fractions summing to 1) -> {'train': 0.8, 'val': 0.1, 'test': 0.1}."""
    parts = str(spec).replace(",", "/").split("/")
    bad = f"split {spec!r} is not {'/'.join(['N'] * len(names))} for {'/'.join(names)}"
    if len(parts) != len(names):
        raise InputError(f"{bad} ({len(parts)} parts given)")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"{bad} (not numbers)") from None
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise InputError(f"{bad} (parts must be >= 0)")
    total = sum(values)
    if not (abs(total - 100) < 1e-6 or abs(total - 1) < 1e-9):
        raise InputError(f"{bad} (parts sum to {total:g}, not 100)")
    if values[0] == 0:
        raise InputError(f"{bad} (train must not be empty)")
    return {name: v / total for name, v in zip(names, values)}


def _allocate(n: int, fractions: dict[str, float]) -> list[str]:
    """n split names in the proportions of `fractions` (largest remainder), spread evenly along the list,
    so that cutting a list sorted by a sub-stratum gives every split its share of each sub-stratum."""
    exact = {name: n * f for name, f in fractions.items()}
    counts = {name: int(np.floor(x)) for name, x in exact.items()}
    names = list(fractions)
    by_remainder = sorted(names, key=lambda name: (-(exact[name] - counts[name]), names.index(name)))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    given = dict.fromkeys(names, 0)
    sequence = []
    for i in range(n):  # at each position, the split furthest behind its even share
        name = max((s for s in names if given[s] < counts[s]), key=lambda s: counts[s] * (i + 1) / n - given[s])
        given[name] += 1
        sequence.append(name)
    return sequence


def assign_splits(
    strata: Sequence[Hashable],
    fractions: dict[str, float],
    seed: int,
    groups: Sequence[Hashable | None] | None = None,
    substrata: Sequence[Hashable] | None = None,
) -> list[str]:
    """Split name per item, in exact proportion within each stratum (the class).

    Items sharing a group (a patient) land together; a group takes the stratum of its first item. Within a
    stratum, units are shuffled with `seed`, then ordered by sub-stratum (the source), so each split also gets
    its share of every sub-stratum without tiny class x source cells all falling to train."""
    n = len(strata)
    groups = groups if groups is not None else [None] * n
    substrata = substrata if substrata is not None else [0] * n
    unit_of: list[Hashable] = [("item", i) if g is None else ("group", g) for i, g in enumerate(groups)]
    unit_key: dict[Hashable, tuple] = {}
    for unit, stratum, sub in zip(unit_of, strata, substrata):
        unit_key.setdefault(unit, (stratum, sub))
    by_stratum: dict[Hashable, list[Hashable]] = defaultdict(list)
    for unit, (stratum, _) in unit_key.items():
        by_stratum[stratum].append(unit)

    rng = np.random.default_rng(seed)
    unit_split: dict[Hashable, str] = {}
    for stratum in sorted(by_stratum, key=repr):  # a fixed order keeps the rng stream reproducible
        units = sorted(by_stratum[stratum], key=repr)
        shuffled = [units[k] for k in rng.permutation(len(units))]
        shuffled.sort(key=lambda unit: repr(unit_key[unit][1]))  # stable: random within each sub-stratum
        for unit, split in zip(shuffled, _allocate(len(shuffled), fractions)):
            unit_split[unit] = split
    return [unit_split[unit] for unit in unit_of]
