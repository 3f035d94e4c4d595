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
from openpyxl import Workbook
from PIL import Image
from twinray.prep import build
from twinray.prep.datasets import covid
from twinray.prep.format import PackedDataset, verify
from twinray.prep.sample import SOURCES

from tests.conftest import REPO, assert_one_line_error, run_prep
from tests.layouts import flatten_covid
from twinray.cli import InputError


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

    result = build.pack(covid.plan(covid_copy), tmp_path / "out", workers=1, progress=False)
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
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old directories left


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
