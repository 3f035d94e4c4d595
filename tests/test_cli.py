"""`python -m prep` as a user runs it: `all`, `info`, `verify`, and one-line errors for bad arguments."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, assert_one_line_error, run_prep
from twinray.cli import int_list, pixel_count, positive_float, positive_int
from twinray.prep.format import PackedDataset


def test_all_packs_what_is_there_and_skips_the_rest(covid_sample, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(covid_sample, raw / "COVID-19_Radiography_Dataset")
    result = run_prep("all", "--raw", raw, "--out", tmp_path / "packed", "--workers", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("packed 60 images into") and "packed/covid" in lines[0]
    assert lines[1].startswith("skip chexpert:") and "not found" in lines[1]
    assert run_prep("verify", tmp_path / "packed" / "covid").returncode == 0


def test_info_prints_counts_per_split_and_class(covid_packed):
    result = run_prep("info", covid_packed)
    assert result.returncode == 0
    out = result.stdout
    for needle in (
        "covid19-radiography (multiclass)",
        "jpeg",
        "shorter side 256 px",
        "Viral Pneumonia",
        "train",
        "val",
        "test",
        "skipped: 0",
        "(60 in all)",
    ):
        assert needle in out, needle


def test_verify_names_the_first_problem(covid_packed, tmp_path):
    broken = shutil.copytree(covid_packed, tmp_path / "broken")
    shard = broken / "train-00001.tar"
    raw = bytearray(shard.read_bytes())
    raw[2000] ^= 0x55
    shard.write_bytes(bytes(raw))
    assert_one_line_error(run_prep("verify", broken), "train-00001.tar", "sha256")

    again = shutil.copytree(covid_packed, tmp_path / "again")
    (again / "val-00000.idx").unlink()
    assert_one_line_error(run_prep("verify", again), "val-00000.idx")


def test_verify_refuses_what_is_not_a_dataset(tmp_path):
    assert_one_line_error(run_prep("verify", tmp_path), "not a packed dataset")
    assert_one_line_error(run_prep("info", tmp_path / "nope"), "no such directory")


def test_bad_argument_values_are_one_line(covid_sample, tmp_path):
    out = tmp_path / "o"
    assert_one_line_error(run_prep("covid", "--src", covid_sample, "--out", out, "--size", "big"), "--size", "big")
    assert_one_line_error(run_prep("covid", "--src", covid_sample, "--out", out, "--workers", "0"), "--workers")
    assert_one_line_error(
        run_prep("covid", "--src", covid_sample, "--out", out, "--encoding", "webp"), "--encoding", "webp"
    )
    assert_one_line_error(
        run_prep("covid", "--src", covid_sample, "--out", out, "--split", "80/10/5"), "split '80/10/5'", "sum to 95"
    )
    assert_one_line_error(run_prep("sample", "--out", out, "--n", "3"), "--n 3")
    assert_one_line_error(run_prep("covid", "--out", out), "--src")


def test_ffcv_writes_one_beton_per_split(covid_packed, tmp_path):
    data = shutil.copytree(covid_packed, tmp_path / "data")
    result = run_prep("ffcv", data, "--splits", "train,val")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (data / "ffcv").iterdir()) == ["train.beton", "val.beton"]
    assert_one_line_error(run_prep("ffcv", data, "--splits", "dev"), "split 'dev'")


def test_info_into_a_closed_pipe_prints_no_traceback(covid_packed):
    """`python -m prep info DIR | head -0`: the reader is gone before prep writes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prep", "info", str(covid_packed)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 141 and stderr == ""


def test_folder_packs_every_good_file_and_names_every_other(tmp_path):
    """The seen failures in one run: a DICOM with Window Width 0 (once a ValueError that stopped `prep folder`),
    a 30,000 x 30,000 1-bit PNG (once a DecompressionBombError traceback), a file past --max-pixels, a text file
    and a broken DICOM, beside 4 good files; 2 worker processes. Exit 0, the summary counts found = packed +
    skipped, the manifest and `info` give each skip's reason and the window note."""
    from PIL import Image

    from tests.test_dicom import RAMP12, RAMP12_8BIT, make_dicom
    from tests.test_images import _blank_bilevel_png

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    for k in range(4):
        Image.fromarray(np.full((30, 40), 50 * k, np.uint8)).save(src / "ab"[k % 2] / f"good{k}.png")
    make_dicom(src / "a" / "ww0.dcm", RAMP12, WindowCenter=2048, WindowWidth=0)
    _blank_bilevel_png(src / "b" / "bomb.png", 30_000, 30_000)
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(src / "b" / "large.png")  # 10,000 px
    (src / "b" / "notes.txt").write_text("not an image")
    (src / "b" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x001.2")
    out = tmp_path / "out"
    result = run_prep(
        "folder",
        "--src",
        src,
        "--out",
        out,
        "--split",
        "100/0/0",
        "--workers",
        "2",
        "--max-pixels",
        "5e3",
        "--encoding",
        "png",
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("packed 5 images into") and "4 skipped (9 found)" in summary
    assert "1 file note in manifest.json" in summary
    data = PackedDataset(out)
    images = {data.metadata(i)["source"]: data.image(i) for i in range(len(data))}
    assert sorted(images) == ["a/good0.png", "a/good2.png", "a/ww0.dcm", "b/good1.png", "b/good3.png"]
    assert [int(images[f"{'ab'[k % 2]}/good{k}.png"][0, 0]) for k in range(4)] == [0, 50, 100, 150]
    np.testing.assert_array_equal(images["a/ww0.dcm"], RAMP12_8BIT)
    reasons = {s["source"]: s["reason"] for s in data.manifest["skipped"]}
    assert set(reasons) == {"b/bomb.png", "b/large.png", "b/notes.txt", "b/broken.dcm"}
    assert "30000 x 30000 pixels" in reasons["b/bomb.png"] and "100 x 100 pixels" in reasons["b/large.png"]
    assert "limit of 5000" in reasons["b/large.png"]
    assert "DICOM" in reasons["b/broken.dcm"]
    assert data.manifest["prep"]["max_pixels"] == 5000
    info = run_prep("info", out).stdout
    assert "skipped: 4" in info and "notes: 1" in info and "a/ww0.dcm: Window Width 0 is invalid" in info


def test_max_pixels_must_be_a_whole_positive_count(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    assert_one_line_error(run_prep("folder", "--src", src, "--out", out, "--max-pixels", "0"), "--max-pixels", "'0'")
    assert_one_line_error(run_prep("folder", "--src", src, "--out", out, "--max-pixels", "1.5"), "--max-pixels")
    assert_one_line_error(run_prep("folder", "--src", src, "--out", out, "--max-pixels", "lots"), "--max-pixels")


@pytest.mark.parametrize(
    "parse, good, bad",
    [
        (positive_int, {"1": 1, "224": 224}, ["0", "-3", "1.5", "x", ""]),
        (positive_float, {"0.5": 0.5, "3e-4": 3e-4}, ["0", "-1", "inf", "nan", "x"]),
        (pixel_count, {"1": 1, "2e8": 200_000_000}, ["0", "1.5", "inf", "-inf", "nan", "x"]),
        (int_list, {"128,224": [128, 224], "7": [7]}, ["0,1", "1,x", "", "1.5"]),
    ],
)
def test_the_number_types_take_what_they_say_and_name_the_rest(parse, good, bad):
    """The argparse types every command shares (twinray/cli.py): each bad text is an ArgumentTypeError naming it,
    never an OverflowError or a value let through (inf is no pixel count and no learning rate)."""
    assert {text: parse(text) for text in good} == good
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
            parse(text)
