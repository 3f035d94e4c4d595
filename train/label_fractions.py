"""Label fractions: stratified train subsets that are nested across fractions for one seed (1% ⊂ 5% ⊂ ... ⊂ 100%).

Each stratum (a class; for multilabel data, a sample's first positive label, or "no finding") is shuffled once per
seed, and a fraction takes the first ceil(f x n) of each stratum, at least one. A larger fraction only ever adds
samples to a smaller one's, so a curve over fractions compares like with like.
"""

from __future__ import annotations

import math

import numpy as np

from twinray.train.labels import POSITIVE


def check_fraction(fraction: float) -> float:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    return fraction


def strata(labels: np.ndarray) -> np.ndarray:
    """One stratum per sample: the class (multiclass, 1-d labels) or the first positive label, -1 for none
    (multilabel codes, 2-d; see train/labels.py)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels.astype(np.int64)
    positive = labels == POSITIVE
    return np.where(positive.any(1), positive.argmax(1), -1)


def label_fraction(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The sorted subset of `rows` (with their `labels`) for `fraction`; nested across fractions for one seed."""
    check_fraction(fraction)
    rows, groups = np.asarray(rows), strata(labels)
    keep = []
    for k, group in enumerate(np.unique(groups)):
        members = rows[groups == group]
        # Seeded by (seed, stratum number) alone: the order, and so the nesting, does not depend on the fraction.
        order = np.random.default_rng([seed, k]).permutation(len(members))
        keep.append(members[order[: max(1, math.ceil(fraction * len(members)))]])
    return np.sort(np.concatenate(keep))
