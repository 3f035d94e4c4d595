"""`python -m prep` as a user runs it: `all`, `info`, `verify`, and one-line errors for bad arguments."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import REPO, assert_one_line_error, run_prep


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
