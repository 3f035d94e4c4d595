"""`prep chexpert` on fixtures made of real train.csv rows with synthetic JPEGs at the real paths."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from twinray.prep import build
from twinray.prep.datasets import chexpert
from twinray.prep.format import LABEL_MISSING, PackedDataset, verify

from tests.conftest import assert_one_line_error, run_prep
from tests.layouts import build_chexpert


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory):
    return build_chexpert(tmp_path_factory.mktemp("chexpert"), n_patients=60)


def _rows(root, name="train.csv"):
    with open(root / name, newline="") as f:
        return list(csv.DictReader(f))


def test_frontal_by_default_and_all_views_on_request(chexpert_root):
    rows = _rows(chexpert_root)
    frontal = [r for r in rows if r["Frontal/Lateral"] == "Frontal"]
    assert len(frontal) < len(rows), "the fixture should hold lateral views"
    plan = chexpert.plan(chexpert_root)
    assert sum(r.split != "test" for r in plan.records) == len(frontal)
    assert all(r.meta["view"] == "Frontal" for r in plan.records)
    everything = chexpert.plan(chexpert_root, views="all")
    assert sum(r.split != "test" for r in everything.records) == len(rows)
    assert {r.meta["ap_pa"] for r in everything.records if r.meta["view"] == "Lateral"} == {None}


def test_labels_keep_all_four_codes(chexpert_root):
    plan = chexpert.plan(chexpert_root, views="all")
    by_source = {r.source: r.meta for r in plan.records}
    seen = set()
    for row in _rows(chexpert_root):
        meta = by_source[row["Path"].split("/", 1)[1]]
        for name in chexpert.LABELS:
            expected = {"": None, "1.0": 1, "0.0": 0, "-1.0": -1}[row[name]]
            assert meta["labels"][name] == expected
            seen.add(expected)
        assert meta["sex"] == row["Sex"] and meta["view"] == row["Frontal/Lateral"]
        assert meta["age"] == (int(row["Age"]) or None)
    assert seen == {None, 1, 0, -1}


def test_valid_is_test_and_patients_never_span_splits(chexpert_root):
    plan = chexpert.plan(chexpert_root, views="all")
    valid_patients = {r["Path"].split("/")[2] for r in _rows(chexpert_root, "valid.csv")}
    assert {r.meta["patient"] for r in plan.records if r.split == "test"} == valid_patients
    splits_of = {}
    for r in plan.records:
        splits_of.setdefault(r.meta["patient"], set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    train = {p for p, s in splits_of.items() if s == {"train"}}
    val = {p for p, s in splits_of.items() if s == {"val"}}
    assert len(val) == 6 and len(train) == 54  # 90/10 of 60 patients


def test_pack_verify_and_multilabel_index(chexpert_root, tmp_path):
    result = build.pack(chexpert.plan(chexpert_root), tmp_path / "out", workers=1, progress=False)
    data = PackedDataset(result.out)
    assert data.task == "multilabel" and data.classes == chexpert.LABELS
    assert result.manifest["splits"]["test"] == 6
    codes = data.labels()
    assert codes.shape == (len(data), 14)
    assert set(np.unique(codes)) <= {1, 0, -1, LABEL_MISSING}
    assert (codes == -1).any() and (codes == LABEL_MISSING).any()
    meta = data.metadata(0)
    assert set(meta) >= {"source", "split", "labels", "patient", "view", "ap_pa", "sex", "age"}
    assert list(verify(result.out))
    info = run_prep("info", result.out)
    assert info.returncode == 0 and "uncertain" in info.stdout and "Pleural Effusion" in info.stdout


def test_full_resolution_prefix_is_resolved(tmp_path):
    root = build_chexpert(tmp_path, n_patients=5, top="CheXpert-v1.0", n_valid=2)
    plan = chexpert.plan(root)
    assert all(r.path.is_file() for r in plan.records)
    assert plan.records[0].source.startswith("train/patient")


def test_missing_image_and_bad_label_are_skipped(tmp_path):
    root = build_chexpert(tmp_path, n_patients=8, n_valid=2)
    rows = _rows(root)
    first = rows[0]["Path"]
    (tmp_path / first).unlink()
    rows[1]["Edema"] = "2.0"
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=chexpert.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    result = build.pack(chexpert.plan(root, views="all"), tmp_path / "out", workers=1, progress=False)
    reasons = [s["reason"] for s in result.manifest["skipped"]]
    assert "file not found" in reasons
    assert any("bad label '2.0'" in r and "Edema" in r for r in reasons)
    assert sum(result.manifest["splits"].values()) == len(rows) + 2 - 2


def test_csv_without_a_label_column_is_one_line(tmp_path):
    root = build_chexpert(tmp_path, n_patients=3, n_valid=1)
    rows = _rows(root)
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=[c for c in chexpert.COLUMNS if c != "Cardiomegaly"], extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(rows)
    result = run_prep("chexpert", "--src", root, "--out", tmp_path / "out")
    assert_one_line_error(result, "train.csv", "Cardiomegaly")


def test_missing_valid_csv_is_one_line(tmp_path):
    root = build_chexpert(tmp_path, n_patients=3, n_valid=1)
    (root / "valid.csv").unlink()
    assert_one_line_error(run_prep("chexpert", "--src", root, "--out", tmp_path / "out"), "valid.csv")


def test_bad_views_value_is_one_line(tmp_path):
    root = build_chexpert(tmp_path, n_patients=2, n_valid=1)
    assert_one_line_error(
        run_prep("chexpert", "--src", root, "--out", tmp_path / "o", "--views", "side"), "--views", "side"
    )
