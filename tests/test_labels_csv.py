"""Labels as users write them: missing values in their usual spellings, one value spelled two ways, and file or
folder names that are not UTF-8 (`prep folder`, and the COVID walker)."""

from __future__ import annotations

import io
import json
import os
import unicodedata

import numpy as np
import pytest
from PIL import Image

from twinray.prep import build
from twinray.prep.cli import main
from twinray.prep.datasets import covid, folder
from twinray.prep.format import MANIFEST, PackedDataset, verify


def _png(value: int, size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: bytes | os.PathLike, data: bytes) -> None:
    """Writes by bytes path, so a name may hold bytes that are not UTF-8."""
    path = os.fsencode(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _table(tmp_path, labels: list[str], patients: list[str] | None = None):
    """Image img/KK.png of grey value 10 * K for each label, and labels.csv listing them in order (line K + 2)."""
    src = tmp_path / "src"
    for k in range(len(labels)):
        _write(src / "img" / f"{k:02d}.png", _png(10 * k))
    header = "path,label" + (",patient" if patients else "")
    rows = [f"img/{k:02d}.png,{label}" + (f",{patients[k]}" if patients else "") for k, label in enumerate(labels)]
    (tmp_path / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return src, tmp_path / "labels.csv"


def _packed(out) -> dict[str, tuple[str, int]]:
    """source -> (class name, mean grey value) of every packed image."""
    data = PackedDataset(out)
    return {
        data.metadata(i)["source"]: (data.classes[data.metadata(i)["label"]], int(data.image(i).mean()))
        for i in range(len(data))
    }


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


MISSING = ["NA", "n/a", " None ", "nan", "?", "NULL", "#N/A", "", "<NA>", "missing", "-NaN"]


def test_missing_label_spellings_are_skipped_by_line_never_classes(tmp_path, capsys):
    labels = ["cat", "dog"] * 3 + MISSING  # images 0..5 labelled, 6..16 missing
    src, table = _table(tmp_path, labels)
    out = tmp_path / "out"
    argv = ["folder", "--src", str(src), "--csv", str(table), "--out", str(out), "--split", "100/0/0"]
    assert main([*argv, "--workers", "1", "--encoding", "png"]) == 0
    summary = capsys.readouterr().out.strip()
    assert f"packed 6 images into {out} (train 6 / val 0 / test 0), 11 skipped (17 found)" == summary
    assert _packed(out) == {f"img/{k:02d}.png": (labels[k], 10 * k) for k in range(6)}
    assert PackedDataset(out).classes == ["cat", "dog"]
    skipped = json.loads((out / MANIFEST).read_text())["skipped"]
    reasons = {s["source"]: s["reason"] for s in skipped}
    expected = {
        f"labels.csv:{k + 8}": f"missing 'label' ({cell.strip()!r})" if cell else "empty 'label'"
        for k, cell in enumerate(MISSING)
    }
    assert reasons == expected


def test_missing_patient_spellings_are_no_patient(tmp_path):
    src, table = _table(tmp_path, ["cat", "dog"] * 5, patients=["p1", "NA", "p1", "null", "", "p2"] + ["p3"] * 4)
    plan = folder.plan(src, csv_file=table, patient_col="patient", split="60/20/20")
    assert [r.meta.get("patient") for r in plan.records] == ["p1", None, "p1", None, None, "p2"] + ["p3"] * 4


def test_blanks_and_unicode_forms_are_one_spelling(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "Pneumonie \u00e9"), unicodedata.normalize("NFD", "Pneumonie \u00e9")
    labels = ["COVID ", " COVID", "COVID", nfc, nfd, "\tCOVID", nfd, nfc, "COVID", nfc]
    src, table = _table(tmp_path, labels)
    plan = folder.plan(src, csv_file=table)
    assert plan.classes == ["COVID", nfc]
    assert [r.meta["class"] for r in plan.records] == [label.strip() if "C" in label else nfc for label in labels]


@pytest.mark.parametrize(
    "first, second",
    [("1", "1.0"), ("1", "01"), ("0", "-0.0"), ("Normal", "NORMAL"), ("Viral Pneumonia", "Viral  Pneumonia")],
)
def test_two_spellings_of_one_label_is_one_line_naming_both(tmp_path, capsys, first, second):
    labels = [first, "other"] * 4 + [second, first]  # the second spelling first seen at line 10
    src, table = _table(tmp_path, labels)
    out = tmp_path / "out"
    assert main(["folder", "--src", str(src), "--csv", str(table), "--out", str(out), "--workers", "1"]) == 2
    line = _one_line(capsys)
    assert line == (
        f"prep: error: {table}: column 'label': {first!r} (labels.csv:2) and {second!r} (labels.csv:10) are two "
        "spellings of one value, which would make two classes; write it one way"
    )
    assert not out.exists()


def test_class_folders_spelled_two_ways_is_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    for k in range(5):
        _write(src / "Normal" / f"n{k}.png", _png(k))
        _write(src / "NORMAL" / f"m{k}.png", _png(k))
    out = tmp_path / "out"
    assert main(["folder", "--src", str(src), "--out", str(out), "--workers", "1"]) == 2
    assert _one_line(capsys) == (
        f"prep: error: {src}: class folders: 'NORMAL' (NORMAL/) and 'Normal' (Normal/) are two spellings of one "
        "value, which would make two classes; write it one way"
    )
    assert not out.exists()


def test_class_folders_in_two_unicode_forms_are_one_class(tmp_path):
    src = tmp_path / "src"
    nfc, nfd = unicodedata.normalize("NFC", "\u00e9panchement"), unicodedata.normalize("NFD", "\u00e9panchement")
    for k in range(4):
        _write(src / nfc / f"c{k}.png", _png(k))
        _write(src / nfd / f"d{k}.png", _png(k))
        _write(src / "normal" / f"n{k}.png", _png(k))
    plan = folder.plan(src, split="50/25/25")
    assert plan.classes == ["normal", nfc]  # by code point
    assert sorted(r.meta["class"] for r in plan.records) == ["normal"] * 4 + [nfc] * 8


def test_names_that_are_not_utf8_are_packed_escaped(tmp_path, capsys):
    # Latin-1 names as old Windows tools leave them on Linux shares: a file, a class folder, and a non-image file.
    src = os.fsencode(tmp_path / "src")
    for k in range(4):
        _write(src + b"/a/%d.png" % k, _png(10 + k))
        _write(src + b"/b/%d.png" % k, _png(50 + k))
    _write(src + b"/a/caf\xe9.png", _png(123))
    _write(src + b"/r\xe9sum\xe9/x.png", _png(200))
    _write(src + b"/b/notes-\xff.txt", b"not an image")
    out = tmp_path / "out"
    argv = ["folder", "--src", os.fsdecode(src), "--out", str(out), "--split", "100/0/0", "--encoding", "png"]
    assert main([*argv, "--workers", "1"]) == 0
    summary = capsys.readouterr().out
    assert "packed 10 images" in summary and "1 skipped (11 found)" in summary
    manifest = json.loads((out / MANIFEST).read_bytes().decode("utf-8"))  # valid UTF-8, strictly
    assert manifest["classes"] == ["a", "b", "r\\xe9sum\\xe9"]
    assert manifest["skipped"] == [{"source": "b/notes-\\xff.txt", "reason": "not an image file (.txt)"}]
    expected = {f"a/{k}.png": ("a", 10 + k) for k in range(4)} | {f"b/{k}.png": ("b", 50 + k) for k in range(4)}
    expected |= {"a/caf\\xe9.png": ("a", 123), "r\\xe9sum\\xe9/x.png": ("r\\xe9sum\\xe9", 200)}
    assert _packed(out) == expected
    assert list(verify(out))


def test_csv_mode_under_a_folder_whose_name_is_not_utf8(tmp_path, capsys):
    src = os.fsencode(tmp_path) + b"/r\xe9sultats"
    for k in range(4):
        _write(src + b"/img/%d.png" % k, _png(30 * k))
    _write(src + b"/img/caf\xe9.png", _png(7))  # not in the CSV: not an input
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"img/{k}.png,{'ab'[k % 2]}\n" for k in range(4)))
    out = tmp_path / "out"
    argv = ["folder", "--src", os.fsdecode(src), "--csv", str(tmp_path / "labels.csv"), "--out", str(out)]
    assert main([*argv, "--split", "100/0/0", "--workers", "1", "--encoding", "png"]) == 0
    assert "packed 4 images" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_bytes().decode("utf-8"))
    assert manifest["dataset"] == "r\\xe9sultats" and manifest["prep"]["src"].endswith("/r\\xe9sultats")
    assert _packed(out) == {f"img/{k}.png": ("ab"[k % 2], 30 * k) for k in range(4)}


def test_covid_walker_packs_a_name_that_is_not_utf8(tmp_path):
    src = os.fsencode(tmp_path / covid.FOLDER_NAME)
    for label, name in enumerate(covid.CLASSES):
        _write(src + b"/%s/images/%s-1.png" % (name.encode(), name.encode()), _png(20 * label))
    _write(src + b"/COVID/images/COVID-caf\xe9.png", _png(99))
    plan = covid.plan(os.fsdecode(src), split="100/0/0")
    result = build.pack(plan, tmp_path / "out", workers=1, progress=False, encoding="png")
    assert result.manifest["skipped"] == []
    values = _packed(result.out)
    assert values["COVID/images/COVID-caf\\xe9.png"] == ("COVID", 99)
    assert len(values) == 5
