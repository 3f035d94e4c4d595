"""`prep folder` on real chest X-rays (../shared/data/real-cxr) and on every supported file type."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_one_line_error, run_prep
from tests.layouts import REAL_CXR
from tests.test_images import _dicom
from twinray.prep import build
from twinray.prep.datasets import folder
from twinray.prep.format import PackedDataset, verify

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
    # a 12-bit detector's TIFF without range tags: scaled by the dataset's --bit-depth (docs/format.md)
    result = build.pack(folder.plan(src, split="100/0/0"), tmp_path / "out", workers=1, progress=False, bit_depth=12)
    data = PackedDataset(result.out)
    assert data.manifest["prep"]["bit_depth"] == 12
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


def _image(path, value, size=(24, 20)):
    """A constant grey PNG (or any suffix PIL writes), so a packed image tells which file it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _packed_values(out):
    data = PackedDataset(out)
    return {
        data.metadata(i)["source"]: (int(data.image(i).mean()), data.metadata(i)["split"]) for i in range(len(data))
    }


def test_symlinked_subfolders_are_packed_and_loops_cut(tmp_path):
    # 10 images: 4 in a/, 3 in b/, 3 in a folder elsewhere that b/more links to. Links back to an ancestor,
    # to the class folder itself and to one of its files must neither hang nor pack anything twice.
    src = tmp_path / "src"
    for k in range(4):
        _image(src / "a" / f"a{k}.png", 10 + k)
    for k in range(3):
        _image(src / "b" / f"b{k}.png", 50 + k)
        _image(tmp_path / "elsewhere" / f"e{k}.png", 90 + k)
    (src / "b" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "up").symlink_to(tmp_path, target_is_directory=True)  # a loop through the source
    (src / "a" / "self").symlink_to(src / "a", target_is_directory=True)
    (src / "a" / "a0-again.png").symlink_to(src / "a" / "a0.png")
    result = run_prep("folder", "--src", src, "--out", tmp_path / "out", "--split", "60/20/20", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "packed 10 images" in result.stdout and "0 skipped" in result.stdout
    assert "1 file(s) reached twice through links, packed once" in result.stdout
    values = _packed_values(tmp_path / "out")
    expected = {f"a/a{k}.png": 10 + k for k in range(4)} | {f"b/b{k}.png": 50 + k for k in range(3)}
    expected |= {f"b/more/e{k}.png": 90 + k for k in range(3)}
    assert {source: value for source, (value, _) in values.items()} == expected


def test_one_file_in_two_class_folders_is_one_line(tmp_path):
    src = tmp_path / "src"
    for k in range(10):
        _image(src / ("a" if k % 2 else "b") / f"x{k}.png", k)
    (src / "a" / "shared.png").symlink_to(src / "b" / "x0.png")
    assert_one_line_error(
        run_prep("folder", "--src", src, "--out", tmp_path / "out"),
        "b/x0.png: is one file in two class folders",
        "a/shared.png: class=a",
        "b/x0.png: class=b",
    )
    assert not (tmp_path / "out").exists()


def test_image_beside_the_class_folders_is_skipped_by_name(tmp_path):
    src = tmp_path / "src"
    for k in range(10):
        _image(src / ("a" if k % 2 else "b") / f"x{k}.png", k)
    _image(src / "stray.png", 7)
    (src / "README.txt").write_text("about these images")
    (src / "IM000001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # a PACS export's DICOM: no suffix
    plan = folder.plan(src)
    assert len(plan.records) == 10
    reason = "image outside the class sub-folders (no class)"
    assert plan.skipped == [{"source": "IM000001", "reason": reason}, {"source": "stray.png", "reason": reason}]


def _labelled_images(src, n=10):
    """n images in img/ with values 20k; labels alternate cat/dog."""
    return {
        f"img/{k:02d}.png": ("cat" if k % 2 else "dog", _image(src / "img" / f"{k:02d}.png", 20 * k)) for k in range(n)
    }


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_csv_with_bom_crlf_and_windows_paths(tmp_path, bom, newline):
    src = tmp_path / "src"
    images = _labelled_images(src)
    lines = [b"path,label,patient"]
    for k, (path, (label, _)) in enumerate(images.items()):
        written = path.replace("/", "\\") if k % 3 == 0 else ("./" + path if k % 3 == 1 else path)
        lines.append(f"{written},{label},p{k}".encode())
    (tmp_path / "labels.csv").write_bytes(bom + newline.join(lines) + newline)
    plan = folder.plan(src, csv_file=tmp_path / "labels.csv", patient_col="patient", split="60/20/20")
    assert plan.classes == ["cat", "dog"] and plan.skipped == []
    got = {r.source: (r.meta["class"], r.meta["patient"], r.path) for r in plan.records}
    assert got == {p: (label, f"p{k}", file) for k, (p, (label, file)) in enumerate(images.items())}
    result = build.pack(plan, tmp_path / "out", workers=1, progress=False)
    assert {s: v for s, (v, _) in _packed_values(result.out).items()} == {p: 20 * k for k, p in enumerate(images)}


def test_csv_path_listed_twice_is_one_sample(tmp_path):
    src = tmp_path / "src"
    images = _labelled_images(src)
    rows = [f"{path},{label}" for path, (label, _) in images.items()]
    rows += ["img\\03.png,cat", "img/./05.png,cat", ",,"]  # 03 and 05 again, as other exporters write them
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    result = run_prep(
        "folder", "--src", src, "--csv", tmp_path / "labels.csv", "--out", tmp_path / "out", "--workers", "1"
    )
    assert result.returncode == 0, result.stderr
    assert "packed 10 images" in result.stdout and "0 skipped" in result.stdout
    assert "2 repeated row(s) of labels.csv merged" in result.stdout
    packed = _packed_values(tmp_path / "out")
    assert sorted(packed) == sorted(images)  # each once, so in exactly one split
    assert packed["img/03.png"][0] == 60


def test_csv_path_listed_twice_with_two_labels_is_one_line(tmp_path):
    src = tmp_path / "src"
    images = _labelled_images(src)
    rows = [f"{path},{label}" for path, (label, _) in images.items()] + ["img\\04.png,cat"]
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    result = run_prep("folder", "--src", src, "--csv", tmp_path / "labels.csv", "--out", tmp_path / "out")
    assert_one_line_error(result, "img/04.png: listed twice", "labels.csv:6: label=dog", "labels.csv:12: label=cat")
    assert not (tmp_path / "out").exists()


def test_csv_rows_cut_short_are_skipped_by_line_and_foreign_encodings_are_one_line(tmp_path):
    src = tmp_path / "src"
    images = _labelled_images(src)
    rows = [f"{path},{label},x" for path, (label, _) in images.items()] + ["img/09.png,cat"]
    (tmp_path / "labels.csv").write_text("path,label,note\n" + "\n".join(rows) + "\n")
    plan = folder.plan(src, csv_file=tmp_path / "labels.csv")
    assert plan.skipped == [{"source": "labels.csv:12", "reason": "2 cells where the header has 3"}]
    (tmp_path / "latin.csv").write_bytes("path,label\nimg/00.png,caf\xe9\n".encode("latin-1"))
    result = run_prep("folder", "--src", src, "--csv", tmp_path / "latin.csv", "--out", tmp_path / "out")
    assert_one_line_error(result, "latin.csv", "not UTF-8", "0xe9")


def test_split_that_would_be_empty_is_one_line(tmp_path):
    src = tmp_path / "src"
    for k in range(4):
        _image(src / ("a" if k % 2 else "b") / f"x{k}.png", k)
    result = run_prep("folder", "--src", src, "--out", tmp_path / "out")
    assert_one_line_error(result, "split 80/10/10 leaves test empty: 4 images are too few")
    assert not (tmp_path / "out").exists()
    assert run_prep("folder", "--src", src, "--out", tmp_path / "out", "--split", "100/0/0").returncode == 0


def test_csv_saved_as_utf16_by_excel_reads_the_same(tmp_path):
    src = tmp_path / "src"
    images = _labelled_images(src)
    text = "path,label\r\n" + "".join(f"{p.replace('/', chr(92))},{label}\r\n" for p, (label, _) in images.items())
    (tmp_path / "labels.csv").write_bytes(text.encode("utf-16"))  # with its BOM
    plan = folder.plan(src, csv_file=tmp_path / "labels.csv")
    assert {r.source: r.meta["class"] for r in plan.records} == {p: label for p, (label, _) in images.items()}
