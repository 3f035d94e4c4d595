"""`prep chexpert` on fixtures made of real train.csv rows with synthetic JPEGs at the real paths."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_prep
from tests.layouts import build_chexpert, write_csv
from twinray.prep import build
from twinray.prep.datasets import chexpert
from twinray.prep.format import LABEL_MISSING, PackedDataset, verify


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
    root = build_chexpert(tmp_path, n_patients=10, top="CheXpert-v1.0", n_valid=2)
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


def _table(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _view(plan):
    return sorted((r.source, r.split, json.dumps(r.meta, sort_keys=True), r.path) for r in plan.records)


@pytest.fixture
def small_root(tmp_path):
    return build_chexpert(tmp_path, n_patients=10, n_valid=3)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_csvs_with_a_bom_and_crlf_give_the_same_plan(small_root, newline):
    before = chexpert.plan(small_root, views="all")
    for name in ("train.csv", "valid.csv"):
        write_csv(small_root / name, _table(small_root / name), bom=True, newline=newline)
    assert (small_root / "train.csv").read_bytes().startswith(b"\xef\xbb\xbfPath,")
    assert _view(chexpert.plan(small_root, views="all")) == _view(before)


def test_paths_with_or_without_the_top_folder_and_with_backslashes_resolve(small_root):
    before = chexpert.plan(small_root, views="all")
    spellings = [
        lambda p: p.split("/", 1)[1],  # train/patient00001/...
        lambda p: p.replace("/", "\\"),  # CheXpert-v1.0-small\train\...
        lambda p: "CheXpert-v1.0/" + p.split("/", 1)[1],  # another top folder's name
        lambda p: "/mnt/data/" + p,  # an absolute path from the machine that wrote it
    ]
    for name in ("train.csv", "valid.csv"):
        header, *rows = _table(small_root / name)
        rows = [[spellings[k % len(spellings)](row[0]), *row[1:]] for k, row in enumerate(rows)]
        write_csv(small_root / name, [header, *rows])
    after = chexpert.plan(small_root, views="all")
    assert _view(after) == _view(before)
    assert all(r.path.is_file() for r in after.records) and after.skipped == []


def test_a_row_listed_twice_is_one_sample(small_root, tmp_path):
    header, *rows = _table(small_root / "train.csv")
    again = [rows[0][0].split("/", 1)[1], *rows[0][1:]]  # the same path, written without the top folder
    write_csv(small_root / "train.csv", [header, *rows, again, rows[2]])
    result = run_prep("chexpert", "--src", small_root, "--views", "all", "--out", tmp_path / "out", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert f"packed {len(rows) + 3} images" in result.stdout and "0 skipped" in result.stdout
    assert "2 repeated row(s) of train.csv/valid.csv merged" in result.stdout
    data = PackedDataset(tmp_path / "out")
    sources = [data.metadata(i)["source"] for i in range(len(data))]
    assert len(sources) == len(set(sources)) == len(rows) + 3


def test_a_path_listed_twice_with_other_labels_is_one_line(small_root, tmp_path):
    header, *rows = _table(small_root / "train.csv")
    edema = header.index("Edema")
    changed = list(rows[1])
    changed[edema] = "1.0" if rows[1][edema] != "1.0" else "0.0"
    write_csv(small_root / "train.csv", [header, *rows, changed])
    result = run_prep("chexpert", "--src", small_root, "--views", "all", "--out", tmp_path / "out")
    path = rows[1][0].split("/", 1)[1]
    assert_one_line_error(result, f"{path}: listed twice", "train.csv:3: Edema=", f"train.csv:{len(rows) + 2}: Edema=")
    assert not (tmp_path / "out").exists()


def test_a_path_in_both_train_and_valid_is_one_line(small_root, tmp_path):
    header, *valid = _table(small_root / "valid.csv")
    train_row = _table(small_root / "train.csv")[1]
    write_csv(small_root / "valid.csv", [header, *valid, train_row])
    result = run_prep("chexpert", "--src", small_root, "--views", "all", "--out", tmp_path / "out")
    assert_one_line_error(result, train_row[0].split("/", 1)[1], "train.csv:2: split=train", "valid.csv:5: split=test")


@pytest.mark.parametrize(
    "valid_rows, why",
    [
        (lambda rows: [], "it lists no rows"),
        (lambda rows: [[r[0], r[1], r[2], "Lateral", "", *r[5:]] for r in rows], "3 row(s): 3 not frontal"),
        (lambda rows: [["elsewhere/x.jpg", *r[1:]] for r in rows], "3 row(s): 3 unusable (first: valid.csv:2: Path"),
    ],
)
def test_valid_csv_that_gives_no_images_is_one_line(small_root, tmp_path, valid_rows, why):
    header, *rows = _table(small_root / "valid.csv")
    write_csv(small_root / "valid.csv", [header, *valid_rows(rows)])
    result = run_prep("chexpert", "--src", small_root, "--out", tmp_path / "out")
    assert_one_line_error(result, "valid.csv: gives the test split no images", why)
    assert not (tmp_path / "out").exists()


def test_too_few_patients_for_a_val_split_is_one_line(tmp_path):
    root = build_chexpert(tmp_path, n_patients=3, n_valid=1)
    result = run_prep("chexpert", "--src", root, "--views", "all", "--out", tmp_path / "out")
    assert_one_line_error(result, "split 90/10 leaves val empty: 3 patients are too few")
    assert run_prep("chexpert", "--src", root, "--split", "100/0", "--out", tmp_path / "out").returncode == 0


def test_valid_images_missing_on_disk_is_one_line_not_an_empty_test_split(small_root, tmp_path):
    # A copy made without valid/: valid.csv lists images that are not there. Test must not be published empty.
    shutil.rmtree(small_root / "valid")
    result = run_prep("chexpert", "--src", small_root, "--out", tmp_path / "out", "--workers", "1")
    assert_one_line_error(result, "the test split came out empty: all 3 of its images were skipped", "file not found")
    assert not (tmp_path / "out").exists()
