"""`prep images`: packing without labels (task none) from a DICOM export, a flat folder of PNGs and a nested folder
of JPEGs; which files are packed and which skipped with which reason, patients kept whole, the headers kept, and
one line for a tree with nothing to pack (issue 20, sections 1 and 3)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.conftest import assert_one_line_error, run_prep
from twinray.prep.cli import describe
from twinray.prep.cli import main as prep_main
from twinray.prep.dicom_headers import Header, parse_age
from twinray.prep.format import LABEL_NONE, PackedDataset, verify


def _pack(capsys, *argv) -> tuple[PackedDataset, str]:
    """`prep images ARGV` in this process: the packed dataset and the summary line."""
    assert prep_main(["images", *map(str, argv), "--workers", "1"]) == 0
    out = Path(argv[list(argv).index("--out") + 1])
    return PackedDataset(out), capsys.readouterr().out.strip().splitlines()[-1]


def _samples(data: PackedDataset) -> dict[str, dict]:
    return {data.metadata(i)["source"]: data.metadata(i) for i in range(len(data))}


@pytest.fixture
def export(tmp_path, capsys) -> Path:
    """`prep sample --dicom-tree` with 3 patients: PT*/ST*/SE*/IM* files without a suffix and a DICOMDIR (pydicom's
    FileSet), 2 studies per patient, each a frontal and a lateral image; an SR per first study; patient 3's second
    study a presentation state and a frontal image without ViewPosition; patient 2's second study a CT image."""
    assert prep_main(["sample", "--dicom-tree", "--out", str(tmp_path / "raw"), "--patients", "3"]) == 0
    capsys.readouterr()
    return tmp_path / "raw" / "dicom-export"


def _headers(root: Path) -> dict[str, pydicom.Dataset]:
    """Every file's header, read here with pydicom alone, by path relative to `root`."""
    return {
        p.relative_to(root).as_posix(): pydicom.dcmread(p, stop_before_pixels=True)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "README.TXT"
    }


def test_dicom_export_packs_frontal_cr_dx_and_skips_the_rest_by_reason(export, tmp_path, capsys):
    headers = _headers(export)
    assert all("." not in name.rsplit("/", 1)[-1] for name in headers)  # no suffix anywhere
    frontal = {
        name
        for name, ds in headers.items()
        if "Rows" in ds and ds.get("Modality") in ("CR", "DX") and ds.get("ViewPosition", "") in ("PA", "AP", "")
    }
    assert len(frontal) == 6
    first = sorted(frontal)[0]
    cut = export / (first[:-1] + "9")  # a frontal image cut short: its header reads, its pixels do not
    cut.write_bytes((export / first).read_bytes()[:-1000])
    data, summary = _pack(capsys, "--src", export, "--out", tmp_path / "out", "--split", "34/33/33")

    samples = _samples(data)
    assert set(samples) == frontal
    reasons = {s["source"]: s["reason"] for s in data.manifest["skipped"]}
    expected = {"DICOMDIR": "DICOMDIR (the export's directory of files, not an image)"}
    expected["README.TXT"] = "not an image file (.TXT)"
    for name, ds in headers.items():
        if ds.get("Modality") == "SR":
            expected[name] = "not an image (Basic Text SR Storage: no pixel data)"
        elif ds.get("Modality") == "PR":
            expected[name] = "not an image (Grayscale Softcopy Presentation State Storage: no pixel data)"
        elif ds.get("Modality") == "CT":
            expected[name] = "other modality (Modality CT)"
        elif ds.get("ViewPosition") == "LL":
            expected[name] = "lateral (ViewPosition LL)"
    assert reasons.pop(cut.relative_to(export).as_posix()).startswith("DICOM pixel data does not decode")
    assert reasons == expected
    assert len(samples) + len(reasons) + 1 == len(headers) + 2  # found = packed + skipped (the README, the cut file)

    # the summary line counts the reasons, the patients and the images kept without ViewPosition
    for needle in (
        "packed 6 images",
        "14 skipped (20 found): 6 lateral (ViewPosition LL), 3 not an image (Basic Text SR Storage: no pixel data)",
        "1 DICOMDIR (the export's directory of files, not an image)",
        "1 DICOM pixel data does not decode, 1 DICOMDIR",  # a long reason counted by its head
        "1 not an image file (.TXT), and 1 other reason",  # the six most common, then how many more kinds
        "3 patients from DICOM PatientID (6 studies), each in one split",
        "kept DICOM images with ViewPosition PA/AP, Modality CR/DX (1 without ViewPosition: kept, unknown)",
    ):
        assert needle in summary, (needle, summary)
    m = data.manifest
    assert (m["task"], m["classes"]) == ("none", [])
    assert m["patients"] == {
        "from": "DICOM PatientID",
        "count": 3,
        "studies": 6,
        "images_without": 0,
        "split": "by patient",
    }
    assert m["selection"]["left_out"] == {"lateral (ViewPosition LL)": 6, "other modality (Modality CT)": 1}
    assert m["selection"]["unknown"] == {"ViewPosition": 1}
    assert (m["selection"]["ViewPosition"], m["selection"]["Modality"]) == (["PA", "AP"], ["CR", "DX"])
    assert (data.labels() == LABEL_NONE).all()

    # each patient's images in one split, and all three splits used
    split_of: dict[str, set] = {}
    for source, meta in samples.items():
        split_of.setdefault(str(headers[source].PatientID), set()).add(meta["split"])
    assert len(split_of) == 3 and all(len(s) == 1 for s in split_of.values())
    assert set.union(*split_of.values()) == {"train", "val", "test"}

    # the headers kept, read back from the packed metadata, against pydicom's reading of each file
    for source, meta in samples.items():
        ds = headers[source]
        assert meta["patient"] == ds.PatientID and meta["study"] == ds.StudyInstanceUID
        assert meta["study_date"] == ds.StudyDate and meta["sex"] == ds.PatientSex
        assert meta["age"] == int(ds.PatientAge[:3]) and meta["modality"] == ds.Modality
        assert meta["view"] == (ds.get("ViewPosition") or None) and meta["body_part"] == "CHEST"
        assert meta["manufacturer"] == "twinray phantom"
        assert "label" not in meta and "class" not in meta

    assert list(verify(tmp_path / "out"))
    info = describe(data)
    assert "unlabeled (task none)" in info and "patients: 3 from DICOM PatientID, 6 studies" in info
    assert "left out: 6 lateral (ViewPosition LL), 1 other modality (Modality CT)" in info
    assert prep_main(["verify", str(tmp_path / "out")]) == 0
    assert "unlabeled: 6 images, no labels" in capsys.readouterr().out


def test_views_and_modalities_all_keep_laterals_and_ct_and_drop_phi_leaves_identifiers_out(export, tmp_path, capsys):
    argv = ("--src", export, "--out", tmp_path / "all", "--views", "all", "--modalities", "all", "--drop-phi")
    data, summary = _pack(capsys, *argv, "--split", "34/33/33")
    samples = _samples(data)
    views = sorted((meta["modality"], meta["view"] or "-") for meta in samples.values())
    assert views.count(("CR", "LL")) == 3 and views.count(("DX", "LL")) == 3 and ("CT", "-") in views
    assert len(samples) == 13 and "6 skipped (19 found)" in summary
    assert "--drop-phi: patient, study, study_date left out" in summary
    for meta in samples.values():
        assert not {"patient", "study", "study_date"} & set(meta), meta
        assert {"view", "modality", "sex", "age", "manufacturer"} <= set(meta)
    assert data.manifest["metadata"]["drop_phi"] is True and data.manifest["patients"]["count"] == 3
    raw = b"".join((tmp_path / "all" / name).read_bytes() for name in data.shard_names)
    assert b"TR0001" not in raw and b"TR0002" not in raw  # no PatientID anywhere in the shards
    # patients are still kept whole: patient k's images come from the folder PT00000k
    split_of: dict[str, set] = {}
    for source, meta in samples.items():
        split_of.setdefault(source.split("/")[0], set()).add(meta["split"])
    assert len(split_of) == 3 and all(len(s) == 1 for s in split_of.values())

    data, _ = _pack(capsys, "--src", export, "--out", tmp_path / "ll", "--views", "LL", "--split", "34/33/33")
    views = [meta["view"] for meta in _samples(data).values()]
    assert sorted(views, key=str) == ["LL"] * 6 + [None]  # the frontal image without ViewPosition: kept, unknown
    assert data.manifest["selection"]["left_out"] == {
        "frontal (ViewPosition PA)": 3,
        "other modality (Modality CT)": 1,
        "frontal (ViewPosition AP)": 2,
    }


def test_header_fields_ages_and_phi():
    assert [parse_age(a) for a in ("045Y", "006M", "014D", "", None, "45")] == [45.0, 0.5, 0.04, None, None, None]
    header = Header("CR", False, True, "PA", "CR", None, "F", 93.0, "acme", "P1", "1.2.3", "20200101")
    assert header.fields()["age"] == 93.0 and header.fields()["patient"] == "P1"
    assert header.fields(drop_phi=True) == {
        "view": "PA",
        "modality": "CR",
        "body_part": None,
        "sex": "F",
        "age": 90,
        "manufacturer": "acme",
    }


def _png(path: Path, value: int, size=(40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def test_flat_folder_of_pngs_with_links_hidden_bad_and_non_utf8_names(tmp_path, capsys):
    src = tmp_path / "flat"
    for k in range(11):
        _png(src / f"x{k:02d}.png", 10 * k)
    _png(src / os.fsdecode(b"caf\xe9.png"), 200)  # latin-1 bytes in the name
    _png(src / ".thumbs" / "t.png", 5)  # hidden: passed over
    _png(src / "masks" / "m.png", 5)  # masks/: passed over, as in prep folder
    (src / "x00-again.png").symlink_to(src / "x00.png")  # one file reached twice: one sample
    (src / "notes.txt").write_text("about these")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    data, summary = _pack(capsys, "--src", src, "--out", tmp_path / "out", "--split", "50/25/25")
    samples = _samples(data)
    assert set(samples) == {f"x{k:02d}.png" for k in range(11)} | {"caf\\xe9.png"}
    assert {int(data.image(i).mean()) for i in range(len(data))} == {10 * k for k in range(11)} | {200}
    reasons = {s["source"]: s["reason"] for s in data.manifest["skipped"]}
    assert set(reasons) == {"notes.txt", "broken.png"} and reasons["notes.txt"] == "not an image file (.txt)"
    assert "broken.png: " not in reasons["broken.png"] and "image" in reasons["broken.png"]  # Pillow's reason
    assert "packed 12 images" in summary and "2 skipped (14 found)" in summary
    assert "1 file(s) reached twice through links, packed once" in summary
    assert "split per image: no patient information" in summary
    assert data.manifest["patients"] == {
        "from": None,
        "count": 0,
        "studies": None,
        "images_without": 12,
        "split": "per image",
    }
    assert data.manifest["selection"]["other_images"] == 12 and data.manifest["selection"]["unknown"] == {}
    assert all(set(meta) == {"source", "split"} for meta in samples.values())  # no header fields for PNGs
    assert data.manifest["splits"] == {"train": 6, "val": 3, "test": 3}
    assert list(verify(tmp_path / "out"))
    assert "patients: none found; the split is per image" in describe(data)


def _jpeg(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((36, 44), value, np.uint8)).save(path, quality=95)
    return path


def test_nested_jpegs_patients_from_a_folder_level_or_a_csv(tmp_path, capsys):
    src = tmp_path / "tree"
    names = []
    for p in range(6):
        for v in range(2):
            for k in range(2):
                names.append(f"site/patient{p}/visit{v}/img{k}.jpeg")
                _jpeg(src / names[-1], 20 * p + 5 * v + k)
    _jpeg(src / "site" / "loose.jpg", 250)  # at level 2 there is no patient folder: its own unit
    data, summary = _pack(
        capsys, "--src", src, "--out", tmp_path / "lvl", "--patient-from", "level:2", "--split", "50/25/25"
    )
    samples = _samples(data)
    assert set(samples) == {*names, "site/loose.jpg"}
    split_of: dict[str, set] = {}
    for source, meta in samples.items():
        if source != "site/loose.jpg":
            assert meta["patient"] == source.split("/")[1]
            split_of.setdefault(meta["patient"], set()).add(meta["split"])
    assert len(split_of) == 6 and all(len(s) == 1 for s in split_of.values())
    assert "patient" not in samples["site/loose.jpg"]
    assert data.manifest["patients"]["count"] == 6 and data.manifest["patients"]["images_without"] == 1
    assert "6 patients from folder level 2 under --src, each in one split; 1 image(s) without a patient" in summary

    table = tmp_path / "patients.csv"
    rows = [f"{name.replace('/', chr(92))},P{int(name.split('/')[1][-1]) // 2}" for name in names]  # 3 patients
    table.write_text("path,patient\n" + "\n".join(rows) + "\n")
    data, summary = _pack(capsys, "--src", src, "--out", tmp_path / "csv", "--csv", table, "--split", "34/33/33")
    assert data.manifest["patients"]["count"] == 3 and "3 patients from column 'patient'" in summary
    split_of = {}
    for meta in _samples(data).values():
        if "patient" in meta:
            split_of.setdefault(meta["patient"], set()).add(meta["split"])
    assert sorted(split_of) == ["P0", "P1", "P2"] and all(len(s) == 1 for s in split_of.values())


def test_tree_with_no_image_is_one_line(tmp_path, export):
    empty = tmp_path / "docs"
    (empty / "a" / "b").mkdir(parents=True)
    (empty / "a" / "b" / "report.pdf").write_bytes(b"%PDF-1.4")
    (empty / "readme.txt").write_text("nothing here")
    result = run_prep("images", "--src", empty, "--out", tmp_path / "o")
    assert_one_line_error(result, "no image file found at any depth", "2 file(s)", "not an image file (.pdf)")
    assert not (tmp_path / "o").exists()

    # DICOM objects that are not images, and only laterals: nothing left, said with the reasons
    only = tmp_path / "non-images"
    for name, ds in _headers(export).items():
        if ds.get("Modality") in ("SR", "PR") or name == "DICOMDIR":
            target = only / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((export / name).read_bytes())
    result = run_prep("images", "--src", only, "--out", tmp_path / "o")
    assert_one_line_error(result, "no image left to pack", "3 not an image (Basic Text SR Storage", "1 DICOMDIR")

    result = run_prep("images", "--src", export, "--out", tmp_path / "o", "--patient-from", "level:0")
    assert_one_line_error(result, "--patient-from 'level:0'")


def test_a_selection_or_level_that_matches_nothing_is_one_line_not_a_silent_pack(tmp_path, export, capsys):
    def refused(*argv) -> str:
        assert prep_main(["images", *map(str, argv), "--out", str(tmp_path / "o"), "--workers", "1"]) == 2
        assert not (tmp_path / "o").exists()
        return capsys.readouterr().err

    # a typo in --views (or a modality the export does not hold) would leave out every DICOM image; beside PNGs it
    # packed the PNGs alone, and on the export itself it failed on a split of one patient
    _png(export / "extra" / "scan.png", 90)
    result = run_prep("images", "--src", export, "--out", tmp_path / "o", "--views", "fronal", "--workers", "1")
    assert_one_line_error(result, "--views FRONAL keeps no DICOM image", "ViewPosition is ", "PA 3", "LL 6")
    assert not (tmp_path / "o").exists()
    err = refused("--src", export, "--modalities", "MR")
    assert "--modalities MR keeps no DICOM image: their Modality is CR 6, DX 6, CT 1" in err, err

    # --patient-from level:N deeper than every image gave no patient at all: the split went per image in silence
    tree = tmp_path / "tree"
    for p in range(4):
        _png(tree / f"patient{p}" / "a.png", 10 * p)
        _png(tree / f"patient{p}" / "b.png", 10 * p + 5)
    err = refused("--src", tree, "--patient-from", "level:3")
    assert (
        "level:3: no image lies in a folder 3 level(s) under" in err
        and "deepest lies 1 level(s) down); give level:1 to level:1" in err
    ), err
    err = refused("--src", tree / "patient0", "--patient-from", "level:1")
    assert "deepest lies 0 level(s) down); give --patient-from none" in err, err
    # a --csv whose paths name none of the images (absolute, or from another root) also split per image in silence
    table = tmp_path / "patients.csv"
    table.write_text("path,patient\n" + "".join(f"/elsewhere/patient{p}/a.png,P{p}\n" for p in range(4)))
    err = refused("--src", tree, "--csv", table)
    assert "none of its 4 paths is an image found under" in err and "'/elsewhere/patient0/a.png'" in err, err
    assert "relative to --src, are like 'patient0/a.png'" in err, err


def test_an_empty_file_and_a_header_cut_short_are_skipped_as_such_not_as_non_images(tmp_path, export, capsys):
    frontal = export / "PT000000" / "ST000000" / "SE000000" / "IM000000"
    data = frontal.read_bytes()
    cut = tmp_path / "odd" / "cut"
    cut.parent.mkdir()
    cut.write_bytes(data[: data.index(b"\x28\x00\x10\x00")])  # ends before Rows (0028,0010): no pixel module
    (tmp_path / "odd" / "empty.dcm").write_bytes(b"")
    (tmp_path / "odd" / "zeros.dcm").write_bytes(b"\0" * 300)  # a .dcm that is no DICOM object at all
    (tmp_path / "odd" / "good").write_bytes(data)
    _, summary = _pack(capsys, "--src", tmp_path / "odd", "--out", tmp_path / "o", "--split", "100/0/0")
    reasons = {s["source"]: s["reason"] for s in PackedDataset(tmp_path / "o").manifest["skipped"]}
    assert reasons == {  # these were "not an image (Computed Radiography Image Storage: no pixel data)", and
        # "not an image (no SOP Class UID: no pixel data)" for the other two
        "cut": "image without its pixel module (Computed Radiography Image Storage: the file is cut short or "
        "incomplete)",
        "empty.dcm": "empty file",
        "zeros.dcm": "not a DICOM object (no SOP Class UID, no pixel data)",
    }
    assert "packed 1 images" in summary and "3 skipped (4 found)" in summary


def test_sample_dicom_tree_keeps_what_it_did_not_write_and_says_when_another_sample_is_there(tmp_path, capsys):
    def sample(out, *extra) -> int:
        return prep_main(["sample", "--dicom-tree", "--out", str(out), *map(str, extra)])

    mine = tmp_path / "media" / "dicom-export"  # someone's own folder of that name, no DICOMDIR: it was deleted
    mine.mkdir(parents=True)
    (mine / "IM0001").write_bytes(b"a real patient's image")
    assert sample(tmp_path / "media", "--patients", "2") == 2
    assert "holds no DICOMDIR, so it is not a sample export; pass --force" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["IM0001"]

    # a complete sample of 3 patients was handed back for --patients 13 ("sample ready"), in silence
    assert sample(tmp_path / "raw", "--patients", "3") == 0
    assert sample(tmp_path / "raw", "--patients", "3") == 0  # the same sample: kept
    capsys.readouterr()
    assert sample(tmp_path / "raw", "--patients", "13") == 2
    err = capsys.readouterr().err
    assert "holds another sample (3 phantom patients, seed 0), not 13 phantom patients, seed 0" in err, err
    assert sample(tmp_path / "raw", "--patients", "4", "--force") == 0
    assert len(list((tmp_path / "raw" / "dicom-export").glob("PT*"))) == 4


def test_prep_folder_on_a_tree_without_classes_names_prep_images(tmp_path):
    src = tmp_path / "flat"
    _png(src / "x.png", 1)
    assert_one_line_error(
        run_prep("folder", "--src", src, "--out", tmp_path / "o"), "no class sub-folders", "prep images --src"
    )
    assert not (tmp_path / "o").exists()


def test_info_describes_an_unlabeled_dataset_written_directly(tmp_path, capsys):
    """A task-none dataset from PackWriter alone (no prep images entries in its manifest): info has no class table
    and says it is unlabeled; verify passes."""
    from twinray.prep.format import PackWriter, encode_image

    writer = PackWriter(tmp_path / "bare", "bare", "none", [], "png", 64)
    for k in range(3):
        image = np.full((20, 24), 40 * k, np.uint8)
        writer.add("train", encode_image(image, "png"), *image.shape, {"value": k})
    writer.finish({"skipped": []})
    assert prep_main(["info", str(tmp_path / "bare")]) == 0
    info = capsys.readouterr().out
    assert "bare (none)" in info and "unlabeled (task none): no classes" in info and "class " not in info
    assert "samples: train 3 / val 0 / test 0 (3 in all)" in info
