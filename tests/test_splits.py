from __future__ import annotations

from collections import Counter

import pytest

from twinray.cli import InputError
from twinray.prep.splits import assign_splits, parse_split

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@pytest.mark.parametrize("spec", ["80/10/10", "0.8/0.1/0.1", "80,10,10"])
def test_parse_split_accepts_percent_and_fractions(spec):
    assert parse_split(spec) == pytest.approx(FRACTIONS)


@pytest.mark.parametrize(
    "spec, why",
    [
        ("80/20", "2 parts"),
        ("a/b/c", "not numbers"),
        ("90/10/10", "sum to 110"),
        ("110/-5/-5", ">= 0"),
        ("0/50/50", "train must not be empty"),
    ],
)
def test_parse_split_rejects_bad_specs(spec, why):
    with pytest.raises(InputError, match=why):
        parse_split(spec)


def test_each_class_is_split_in_proportion():
    strata = [0] * 500 + [1] * 100 + [2] * 30
    splits = assign_splits(strata, FRACTIONS, seed=0)
    for label, n in ((0, 500), (1, 100), (2, 30)):
        counts = Counter(s for s, c in zip(splits, strata) if c == label)
        assert counts["train"] == round(0.8 * n) and counts["val"] == round(0.1 * n) == counts["test"]


def test_sources_spread_over_splits_within_a_class():
    # 200 items of one class from two sources, 40 from the rare one: each split gets its share of both.
    strata = [0] * 200
    sources = ["big"] * 160 + ["rare"] * 40
    splits = assign_splits(strata, FRACTIONS, seed=3, substrata=sources)
    for split, share in FRACTIONS.items():
        rare = sum(1 for s, src in zip(splits, sources) if s == split and src == "rare")
        assert abs(rare - 40 * share) <= 1


def test_groups_never_span_splits():
    patients = [f"p{i // 3}" for i in range(300)]  # 3 images per patient
    strata = [i % 2 for i in range(300)]
    splits = assign_splits(strata, FRACTIONS, seed=1, groups=patients)
    per_patient = {}
    for patient, split in zip(patients, splits):
        per_patient.setdefault(patient, set()).add(split)
    assert all(len(s) == 1 for s in per_patient.values())
    assert Counter(splits)["val"] > 0 and Counter(splits)["test"] > 0


def test_same_seed_same_split_other_seed_other_split():
    strata = [i % 4 for i in range(200)]
    assert assign_splits(strata, FRACTIONS, 7) == assign_splits(strata, FRACTIONS, 7)
    assert assign_splits(strata, FRACTIONS, 7) != assign_splits(strata, FRACTIONS, 8)


def test_totals_are_rounded_over_the_whole_set_not_class_by_class():
    # 8 images in 4 classes: class by class, 80/10/10 rounds to 8/0/0; over the whole set it is 6/1/1.
    strata = [0, 0, 0, 0, 1, 1, 2, 3]
    splits = assign_splits(strata, FRACTIONS, seed=0)
    assert Counter(splits) == {"train": 6, "val": 1, "test": 1}
    for label in set(strata):  # each class still within one image of its own share
        n = strata.count(label)
        assert abs(sum(1 for s, c in zip(splits, strata) if c == label and s == "train") - 0.8 * n) < 1


@pytest.mark.parametrize(
    "groups, what", [(None, "3 images"), (["p1", "p1", "p2"], "2 patients"), (["p1", None, None], "3 units")]
)
def test_a_split_that_would_be_empty_is_an_error(groups, what):
    with pytest.raises(InputError, match=f"leaves val and test empty: {what} are too few"):
        assign_splits([0, 1, 2], FRACTIONS, seed=0, groups=groups)
    assert set(assign_splits([0, 1, 2], {"train": 1.0, "val": 0.0, "test": 0.0}, seed=0, groups=groups)) == {"train"}
