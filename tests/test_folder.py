"""`prep folder` on real chest X-rays (../shared/data/real-cxr) and on every supported file type."""

from __future__ import annotations

import csv
import shutil

import numpy as np
from PIL import Image
from twinray.prep import build
from twinray.prep.datasets import folder
from twinray.prep.format import PackedDataset, verify

from tests.conftest import assert_one_line_error, run_prep
from tests.layouts import REAL_CXR
from tests.test_images import _dicom

NIH = REAL_CXR / "nih-cxr14"
MHH = REAL_CXR / "mhh-covid19"


def test_real_nih_images_from_class_folders_rgba_included(tmp_path):
    result = run_prep("folder", "--src", NIH, "--out", tmp_path / "nih", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "packed 300 images" in result.stdout and "0 skipped" in result.stdout
    data = PackedDataset(tmp_path / "nih")
    assert data.classes == ["No_findings", "Pneumonia"]
    assert (np.asarray(data.index["height"]) == 256).all() and (np.asarray(data.index["width"]) == 256).all()
    packed = {data.metadata(i)["source"]: i for i in range(len(data))}
    for rgba in ("Pneumonia/00000773_001.png", "Pneumonia/00004808_003.png"):
        image = data.image(packed[rgba])
        assert image.ndim == 2 and image.std() > 20  # a real radiograph, not a flat alpha plane
    assert run_prep("verify", tmp_path / "nih").returncode == 0


def test_real_mhh_images_with_csv_keep_patients_whole(tmp_path):
    # data.csv lists image ids and patients; several images per patient. Label: the projection (ap/pa).
    table = tmp_path / "mhh.csv"
    with open(MHH / "data.csv", newline="") as f, open(table, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["file", "view", "patient"])
        for row in csv.DictReader(f):
            writer.writerow([f"png/{row['image_id']}.png", row["projection"], row["patient_id"]])
    plan = folder.plan(MHH, csv_file=table, path_col="file", label_col="view", patient_col="patient")
    splits_of = {}
    for r in plan.records:
        splits_of.setdefault(r.meta["patient"], set()).add(r.split)
    assert len(splits_of) == 71 and all(len(s) == 1 for s in splits_of.values())
    assert {r.split for r in plan.records} == {"train", "val", "test"}
    result = build.pack(plan, tmp_path / "mhh", workers=2, progress=False)
    data = PackedDataset(result.out)
    assert len(data) == 243 and data.classes == ["ap", "pa"]
    assert int(np.asarray(data.index["width"]).min()) == 256  # 640 wide, 519+ high: width is the longer side
    assert list(verify(result.out))


def test_every_file_type_in_class_folders(tmp_path):
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name / "nested").mkdir(parents=True)
    ramp = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1))
    Image.fromarray(ramp).save(src / "a" / "x.png")
    Image.fromarray(ramp).save(src / "a" / "x.jpeg")
    Image.fromarray(ramp).save(src / "a" / "nested" / "x.bmp")
    Image.fromarray(ramp.astype(np.uint16) * 16).save(src / "b" / "x.tif")
    _dicom(src / "b" / "x.dcm", ramp.astype(np.uint16) * 16, "MONOCHROME1")
    (src / "b" / "masks").mkdir()
    Image.fromarray(ramp).save(src / "b" / "masks" / "x.png")
    (src / "b" / "notes.docx").write_bytes(b"PK\x03\x04")
    result = build.pack(folder.plan(src, split="100/0/0"), tmp_path / "out", workers=1, progress=False)
    data = PackedDataset(result.out)
    sources = sorted(data.metadata(i)["source"] for i in range(len(data)))
    assert sources == ["a/nested/x.bmp", "a/x.jpeg", "a/x.png", "b/x.dcm", "b/x.tif"]
    assert [s["source"] for s in result.manifest["skipped"]] == ["b/notes.docx"]
    by_source = {data.metadata(i)["source"]: data.image(i) for i in range(len(data))}
    tif, dcm = by_source["b/x.tif"].astype(int), by_source["b/x.dcm"].astype(int)
    assert np.abs(tif - ramp).max() <= 1  # 12-bit TIFF scaled back
    assert np.abs(dcm - (255 - ramp)).max() <= 1  # MONOCHROME1 inverted


def test_csv_without_needed_columns_is_one_line(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("filename,diagnosis\nx.png,a\n")
    result = run_prep("folder", "--src", NIH, "--csv", table, "--out", tmp_path / "o")
    assert_one_line_error(result, "t.csv", "path", "label", "found: filename, diagnosis")


def test_folder_without_class_folders_is_one_line(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    shutil.copy(NIH / "Pneumonia" / "00000150_002.png", src)
    assert_one_line_error(run_prep("folder", "--src", src, "--out", tmp_path / "o"), "no class sub-folders")


def test_bad_split_spec_is_one_line(tmp_path):
    result = run_prep("folder", "--src", NIH, "--out", tmp_path / "o", "--split", "70/20")
    assert_one_line_error(result, "split '70/20'")
