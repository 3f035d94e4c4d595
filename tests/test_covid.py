"""`prep covid` on the exact layout of the COVID-19 Radiography Database (built by `prep sample`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from openpyxl import Workbook, load_workbook
from PIL import Image

from tests.conftest import REPO, assert_one_line_error, run_prep
from tests.layouts import flatten_covid
from twinray.cli import InputError
from twinray.prep import build
from twinray.prep.cli import describe
from twinray.prep.datasets import covid
from twinray.prep.format import PackedDataset, verify
from twinray.prep.sample import SOURCES


@pytest.fixture
def covid_copy(covid_sample, tmp_path):
    return shutil.copytree(covid_sample, tmp_path / covid.FOLDER_NAME)


def test_plan_reads_the_real_layout(covid_sample):
    plan = covid.plan(covid_sample)
    assert plan.classes == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert len(plan.records) == 60
    assert not any("masks/" in r.source for r in plan.records)
    sources = {r.source for r in plan.records}
    assert "Viral Pneumonia/images/Viral Pneumonia-1.png" in sources
    assert "Lung_Opacity/images/Lung_Opacity-1.png" in sources
    by_class = Counter(r.meta["class"] for r in plan.records)
    assert by_class["Normal"] > by_class["Lung_Opacity"] > by_class["COVID"] > 0
    # Every image, Normal's upper-cased NORMAL-k included, finds its source URL in the xlsx.
    assert all(r.meta["origin"] in SOURCES.values() for r in plan.records)
    assert {r.meta["origin"] for r in plan.records if r.meta["class"] == "Normal"} <= {
        SOURCES["rsna"],
        SOURCES["kermany"],
    }


def test_older_flat_layout_gives_the_same_images(covid_sample, covid_copy):
    flatten_covid(covid_copy)
    new = covid.plan(covid_sample)
    old = covid.plan(covid_copy)
    assert [r.source.replace("images/", "") for r in new.records] == [r.source for r in old.records]
    assert [r.split for r in new.records] == [r.split for r in old.records]


def test_every_class_reaches_every_split(covid_sample):
    records = covid.plan(covid_sample).records
    splits = Counter((r.meta["label"], r.split) for r in records)
    sizes = Counter(r.meta["label"] for r in records)
    for label in range(4):
        assert abs(splits[(label, "train")] - 0.8 * sizes[label]) < 1
        if sizes[label] >= 10:  # 10% of fewer than 10 rounds to nothing
            assert splits[(label, "val")] >= 1 and splits[(label, "test")] >= 1


def test_bad_files_are_skipped_and_the_rest_packed(covid_copy, tmp_path):
    images = covid_copy / "COVID" / "images"
    (images / "COVID-900.png").write_bytes(b"")
    good = (images / "COVID-1.png").read_bytes()
    (images / "COVID-901.png").write_bytes(good[: len(good) // 3])
    (images / "COVID-902.png").write_text("<html>not a png</html>")
    (images / "notes.txt").write_text("hello")
    Image.new("RGB", (320, 300), (90, 90, 90)).save(images / "COVID-903.png")
    Image.new("RGBA", (300, 300), (50, 60, 70, 255)).save(images / "COVID-904.png")
    Image.fromarray(np.full((300, 300), 4095, np.uint16)).save(images / "COVID-905.png")

    result = build.pack(covid.plan(covid_copy), tmp_path / "out", workers=1, progress=False, bit_depth=12)
    reasons = {s["source"]: s["reason"] for s in result.manifest["skipped"]}
    assert set(reasons) == {
        f"COVID/images/{n}" for n in ("COVID-900.png", "COVID-901.png", "COVID-902.png", "notes.txt")
    }
    assert "empty" in reasons["COVID/images/COVID-900.png"]
    assert "truncated" in reasons["COVID/images/COVID-901.png"]
    assert "not an image" in reasons["COVID/images/COVID-902.png"]
    assert "4 skipped" in result.summary
    data = PackedDataset(result.out)
    assert len(data) == 63
    packed = {data.metadata(i)["source"]: i for i in range(len(data))}
    assert abs(int(data.image(packed["COVID/images/COVID-903.png"]).mean()) - 90) <= 1
    assert int(data.image(packed["COVID/images/COVID-905.png"]).mean()) == 255  # 12-bit white
    assert (
        data.index["height"][packed["COVID/images/COVID-903.png"]],
        data.index["width"][packed["COVID/images/COVID-903.png"]],
    ) == (256, 273)
    assert list(verify(result.out))


def test_sample_json_holds_source_split_label_origin(covid_packed):
    data = PackedDataset(covid_packed)
    meta = data.metadata(int(data.indices("val")[0]))
    assert meta["split"] == "val"
    assert meta["class"] == data.classes[meta["label"]]
    assert meta["source"].startswith(meta["class"] + "/images/")
    assert meta["origin"].startswith("https://")
    assert data.manifest["image"] == {"size": 256, "encoding": "jpeg", "channels": 1, "dtype": "uint8"}
    assert data.manifest["prep"]["split"] == "80/10/10"


def test_output_is_byte_identical_for_any_worker_count(covid_sample, tmp_path):
    plan = covid.plan(covid_sample)
    one = build.pack(plan, tmp_path / "one", workers=1, shard_samples=16, progress=False).out
    two = build.pack(plan, tmp_path / "two", workers=2, shard_samples=16, progress=False).out
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) >= 8
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_rerun_does_nothing_and_force_rebuilds(covid_sample, tmp_path):
    out = tmp_path / "out"
    assert run_prep("covid", "--src", covid_sample, "--out", out, "--workers", "1").returncode == 0
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = run_prep("covid", "--src", covid_sample, "--out", out, "--workers", "1")
    assert again.returncode == 0 and "already packed" in again.stdout
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    forced = run_prep("covid", "--src", covid_sample, "--out", out, "--workers", "1", "--force", "--encoding", "png")
    assert forced.returncode == 0 and "packed 60 images" in forced.stdout
    assert PackedDataset(out).encoding == "png"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]  # no temp or old directories left


def test_killed_run_leaves_nothing_a_loader_accepts(tmp_path):
    from twinray.prep import sample

    src = sample.generate(tmp_path / "raw", n=400, seed=2)
    out = tmp_path / "packed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prep",
            "covid",
            "--src",
            str(src),
            "--out",
            str(out),
            "--workers",
            "1",
            "--encoding",
            "png",
            "--shard-samples",
            "8",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.glob(".packed.tmp-*/train-00002.tar")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".packed.tmp-*")), "the run finished before it could be killed"
    assert not out.exists()
    with pytest.raises(InputError):
        PackedDataset(next(tmp_path.glob(".packed.tmp-*")))
    assert run_prep("verify", out).returncode == 2

    rerun = run_prep("covid", "--src", src, "--out", out, "--workers", "2", "--encoding", "png")
    assert rerun.returncode == 0, rerun.stderr
    assert run_prep("verify", out).returncode == 0
    assert not list(tmp_path.glob(".packed.tmp-*"))


def test_missing_class_folder_is_one_line(covid_copy):
    shutil.rmtree(covid_copy / "Viral Pneumonia")
    result = run_prep("covid", "--src", covid_copy, "--out", covid_copy.parent / "out")
    assert_one_line_error(result, "Viral Pneumonia", str(covid_copy))


def test_missing_source_folder_is_one_line(tmp_path):
    result = run_prep("covid", "--src", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert_one_line_error(result, "nowhere", "no such folder")


def test_metadata_without_url_column_is_one_line(covid_copy):
    book = Workbook()
    book.active.title = "Sheet1"
    book.active.append(["FILE NAME", "FORMAT", "SIZE"])
    book.save(covid_copy / "COVID.metadata.xlsx")
    result = run_prep("covid", "--src", covid_copy, "--out", covid_copy.parent / "out")
    assert_one_line_error(result, "COVID.metadata.xlsx", "URL")


def test_foreign_output_directory_is_refused(covid_sample, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    result = run_prep("covid", "--src", covid_sample, "--out", tmp_path / "out")
    assert_one_line_error(result, "not a packed dataset")
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def _metadata(xlsx):
    """FILE NAME -> URL rows of one metadata workbook."""
    book = load_workbook(xlsx, read_only=True)
    rows = list(book["Sheet1"].iter_rows(min_row=2, values_only=True))
    book.close()
    return [(row[0], row[3]) for row in rows]


def _write_metadata(xlsx, rows):
    book = Workbook()
    book.active.title = "Sheet1"
    book.active.append(["FILE NAME", "FORMAT", "SIZE", "URL"])
    for name, url in rows:
        book.active.append([name, "PNG", "256*256", url])
    book.save(xlsx)


@pytest.mark.parametrize("spell", [str.lower, lambda n: n + ".png", lambda n: n.lower() + ".PNG", lambda n: n.upper()])
def test_metadata_names_match_whatever_their_case_or_extension(covid_sample, covid_copy, spell):
    expected = {r.source: r.meta["origin"] for r in covid.plan(covid_sample).records}
    for name in covid.CLASSES:
        xlsx = covid_copy / f"{name}.metadata.xlsx"
        _write_metadata(xlsx, [(spell(file_name), url) for file_name, url in _metadata(xlsx)])
    plan = covid.plan(covid_copy)
    assert {r.source: r.meta["origin"] for r in plan.records} == expected
    assert covid.UNKNOWN_ORIGIN not in expected.values() and plan.scan_notes == []


def test_images_without_metadata_are_counted_on_the_summary_line(covid_copy, tmp_path):
    covid_rows = _metadata(covid_copy / "COVID.metadata.xlsx")
    _write_metadata(covid_copy / "COVID.metadata.xlsx", covid_rows[2:])  # COVID-1 and COVID-2 lose their row
    (covid_copy / "Viral Pneumonia.metadata.xlsx").unlink()
    n_viral = len(list((covid_copy / "Viral Pneumonia" / "images").iterdir()))
    plan = covid.plan(covid_copy)
    unknown = sorted(r.source for r in plan.records if r.meta["origin"] == covid.UNKNOWN_ORIGIN)
    assert unknown[:2] == ["COVID/images/COVID-1.png", "COVID/images/COVID-2.png"]
    assert len(unknown) == 2 + n_viral
    note = (
        f"{2 + n_viral} image(s) without a source URL, origin unknown: COVID 2 (not in COVID.metadata.xlsx), "
        f"Viral Pneumonia {n_viral} (no Viral Pneumonia.metadata.xlsx)"
    )
    assert plan.scan_notes == [note]
    result = build.pack(plan, tmp_path / "out", size=32, workers=1, progress=False)
    assert result.summary.endswith(f"0 skipped ({len(plan.records)} found); {note}")
    assert result.manifest["scan_notes"] == [note]
    assert f"  note: {note}" in describe(PackedDataset(tmp_path / "out")).splitlines()  # prep info says it too


def test_symlinked_folders_are_followed_and_loops_cut(covid_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "batch2"
    elsewhere.mkdir(parents=True)
    for k in range(3):
        Image.new("L", (40, 40), 30 * k + 40).save(elsewhere / f"COVID-{900 + k}.png")
    images = covid_copy / "COVID" / "images"
    (images / "batch2").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(covid_copy, target_is_directory=True)  # back to the dataset root
    (images / "again").symlink_to(images, target_is_directory=True)  # to its own folder
    (images / "COVID-1-link.png").symlink_to(images / "COVID-1.png")  # one file reached twice
    plan = covid.plan(covid_copy)
    sources = [r.source for r in plan.records]
    assert len(sources) == 63 and len(set(sources)) == 63
    linked = [s for s in sources if "batch2" in s]
    assert linked == [f"COVID/images/batch2/COVID-{900 + k}.png" for k in range(3)]
    assert "COVID/images/COVID-1-link.png" not in sources
    assert plan.scan_notes == [
        "3 image(s) without a source URL, origin unknown: COVID 3 (not in COVID.metadata.xlsx)",
        "1 file(s) reached twice through links, packed once",
    ]
    result = build.pack(plan, tmp_path / "out", size=32, workers=1, progress=False)
    data = PackedDataset(result.out)
    packed = {data.metadata(i)["source"]: data.image(i) for i in range(len(data))}
    assert len(packed) == 63 and int(packed["COVID/images/batch2/COVID-902.png"].mean()) == 100


def test_one_file_in_two_class_folders_is_one_line(covid_copy):
    (covid_copy / "Normal" / "images" / "Normal-900.png").symlink_to(covid_copy / "COVID" / "images" / "COVID-1.png")
    result = run_prep("covid", "--src", covid_copy, "--out", covid_copy.parent / "out")
    assert_one_line_error(
        result, "Normal/images/Normal-900.png: is one file in two class folders", "COVID/images/COVID-1.png"
    )


def test_rerun_with_other_settings_is_one_line_and_keeps_the_dataset(covid_sample, tmp_path, monkeypatch, capsys):
    """ "already packed" only when --out holds what this run would pack; other settings are named, exit 2."""
    from twinray.prep.cli import main as prep_main

    out = tmp_path / "out"
    assert prep_main(["covid", "--src", str(covid_sample), "--out", str(out), "--workers", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert prep_main(["covid", "--src", str(covid_sample), "--out", str(out), "--size", "64", "--encoding", "png"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"prep: error: {out} holds a dataset packed with other settings: size 256, now 64; encoding 'jpeg', now "
        "'png'; use --force to rebuild it, or another --out"
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.chdir(covid_sample.parent)  # the same source named by a relative path is the same source
    assert prep_main(["covid", "--src", covid_sample.name, "--out", str(out), "--workers", "1"]) == 0
    assert capsys.readouterr().out.startswith("already packed (use --force to rebuild)")
