"""Deterministic train/val/test splits: stratified by a key, and kept whole per patient when there is one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

from twinray.cli import InputError
from twinray.prep.format import SPLITS


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


def _largest_remainder(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """n units in the proportions of `fractions`: floors, then the leftover units to the largest remainders."""
    exact = {name: n * f for name, f in fractions.items()}
    counts = {name: int(np.floor(x)) for name, x in exact.items()}
    names = list(fractions)
    by_remainder = sorted(names, key=lambda name: (-(exact[name] - counts[name]), names.index(name)))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def _stratum_counts(sizes: dict[Hashable, int], fractions: dict[str, float]) -> dict[Hashable, dict[str, int]]:
    """Units per split for each stratum: within one unit of the stratum's exact share, and with the totals of the
    whole set rounded as one (largest remainder).

    Rounding each class alone can leave a split empty: 8 images in 4 classes at 80/10/10 round to 8/0/0 class by
    class, against 6/1/1 as a whole. Units are then moved, one at a time, from a split over its total to one
    under it, in the stratum where the move brings both counts closest to their exact shares."""
    counts = {stratum: _largest_remainder(n, fractions) for stratum, n in sizes.items()}
    target = _largest_remainder(sum(sizes.values()), fractions)
    while True:
        totals = {name: sum(c[name] for c in counts.values()) for name in fractions}
        short = next((name for name in fractions if totals[name] < target[name]), None)
        if short is None:
            return counts
        over = next(name for name in fractions if totals[name] > target[name])

        def gain(stratum: Hashable, short: str = short, over: str = over) -> float:
            n, c = sizes[stratum], counts[stratum]
            return (n * fractions[short] - c[short]) + (c[over] - n * fractions[over])

        stratum = max((s for s in counts if counts[s][over] > 0), key=gain)  # first of equals: sorted order
        counts[stratum][over] -= 1
        counts[stratum][short] += 1


def _spread(counts: dict[str, int]) -> list[str]:
    """The split names of `counts`, spread evenly along a list, so that cutting a list sorted by a sub-stratum
    gives every split its share of each sub-stratum."""
    n = sum(counts.values())
    given = dict.fromkeys(counts, 0)
    sequence = []
    for i in range(n):  # at each position, the split furthest behind its even share
        name = max((s for s in counts if given[s] < counts[s]), key=lambda s: counts[s] * (i + 1) / n - given[s])
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
    """Split name per item, in proportion within each stratum (the class) and over the whole set.

    Items sharing a group (a patient) land together; a group takes the stratum of its first item. Within a
    stratum, units are shuffled with `seed`, then ordered by sub-stratum (the source), so each split also gets
    its share of every sub-stratum without tiny class x source cells all falling to train.
    Raises InputError when a split with a share above 0 would get no unit (too few images or patients): an empty
    validation or test split is never handed on in silence."""
    n = len(strata)
    groups = groups if groups is not None else [None] * n
    substrata = substrata if substrata is not None else [0] * n
    unit_of: list[Hashable] = [("item", i) if g is None else ("group", g) for i, g in enumerate(groups)]
    unit_key: dict[Hashable, tuple] = {}
    for unit, stratum, sub in zip(unit_of, strata, substrata):
        unit_key.setdefault(unit, (stratum, sub))
    by_stratum: dict[Hashable, list[Hashable]] = defaultdict(list)
    for unit, (stratum, _) in sorted(unit_key.items(), key=lambda kv: repr(kv[1][0])):
        by_stratum[stratum].append(unit)  # a fixed order keeps the rng stream and the moves reproducible
    counts = _stratum_counts({stratum: len(units) for stratum, units in by_stratum.items()}, fractions)
    _require_every_split(counts, fractions, unit_of)

    rng = np.random.default_rng(seed)
    unit_split: dict[Hashable, str] = {}
    for stratum, units in by_stratum.items():
        units = sorted(units, key=repr)
        shuffled = [units[k] for k in rng.permutation(len(units))]
        shuffled.sort(key=lambda unit: repr(unit_key[unit][1]))  # stable: random within each sub-stratum
        for unit, split in zip(shuffled, _spread(counts[stratum])):
            unit_split[unit] = split
    return [unit_split[unit] for unit in unit_of]


def _require_every_split(counts: dict, fractions: dict[str, float], unit_of: list[Hashable]) -> None:
    empty = [name for name in fractions if fractions[name] > 0 and not any(c[name] for c in counts.values())]
    if empty:
        kinds = {kind for kind, _ in unit_of}
        what = {frozenset({"group"}): "patients", frozenset({"item"}): "images"}.get(frozenset(kinds), "units")
        units = len(set(unit_of))
        shares = "/".join(f"{round(100 * f, 6):g}" for f in fractions.values())
        named = " and ".join(empty)
        raise InputError(
            f"split {shares} leaves {named} empty: {units} {what} are too few; add images, or give {named} a "
            "share of 0 (--split)"
        )
