"""A --batch-size that cannot train is refused by the real CLIs before anything is written: one line, exit code 2."""

from __future__ import annotations

import pytest

from tests.conftest import assert_one_line_error, run_torchrun, twinray_here
from twinray.train.config import ConfigError, check_batch_size

PRETRAIN_TINY = ["--size", "32", "--projector", "64", "--wandb", "disabled", "--workers", "1", "--epochs", "1"]
FINETUNE_TINY = ["--init", "random", "--size", "32", "--epochs", "1", "--workers", "1"]


def test_the_per_process_batch_of_a_step_needs_two_images():
    assert check_batch_size(4, processes=2) == 2
    assert check_batch_size(2) == 2
    with pytest.raises(ConfigError, match=r"--batch-size 2 over 2 processes leaves 1 per process"):
        check_batch_size(2, processes=2)
    with pytest.raises(ConfigError, match=r"--batch-size 5 does not split evenly over 2 processes"):
        check_batch_size(5, processes=2)
    for bad in (1, 0, -3):
        with pytest.raises(ConfigError, match=rf"--batch-size {bad}: training needs at least 2 images"):
            check_batch_size(bad)


@pytest.mark.parametrize("batch", ["1", "0"])
def test_pretrain_refuses_a_batch_of_one_before_writing(covid_packed, batch, tmp_path, capsys):
    out = tmp_path / "run"
    result = twinray_here(
        capsys, "pretrain", "--data", covid_packed, "--out", out, *PRETRAIN_TINY, "--batch-size", batch
    )
    assert_one_line_error(result, f"--batch-size {batch}", "at least 2 images per process")
    assert not out.exists()  # no config.json left behind


def test_pretrain_refuses_a_batch_larger_than_the_train_split_before_writing(covid_packed, tmp_path, capsys):
    out = tmp_path / "run"
    result = twinray_here(
        capsys, "pretrain", "--data", covid_packed, "--out", out, *PRETRAIN_TINY, "--batch-size", "64"
    )
    assert_one_line_error(result, "--batch-size 64 is larger than the train split (48 images)")
    assert not out.exists()


def test_pretrain_on_two_processes_refuses_one_image_per_process_before_writing(covid_packed, tmp_path):
    out = tmp_path / "run"
    result = run_torchrun(
        "train/pretrain.py",
        *("--data", covid_packed, "--out", out, *PRETRAIN_TINY, "--batch-size", "2", "--grad-accum", "2"),
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert len(errors) == 2, result.stderr[-3000:]  # each process says it, in one line
    assert all("--batch-size 2 over 2 processes leaves 1 per process" in line for line in errors), errors
    assert "Expected more than 1 value per channel" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_finetune_refuses_a_batch_of_one_before_writing(covid_packed, mode, tmp_path, capsys):
    # A batch of one failed in BatchNorm in full mode; in linear mode every step was skipped and the run wrote a
    # results.json of an untrained head.
    out = tmp_path / "run"
    result = twinray_here(
        capsys, "finetune", "--data", covid_packed, "--out", out, *FINETUNE_TINY, "--mode", mode, "--batch-size", "1"
    )
    assert_one_line_error(result, "--batch-size 1", "at least 2 images")
    assert not out.exists()


@pytest.mark.parametrize(("batch", "needle"), [("1", "at least 2 images"), ("64", "larger than the train split (48")])
def test_lr_find_refuses_a_batch_that_cannot_train_before_writing(covid_packed, batch, needle, tmp_path, capsys):
    # 64 > 48 train images: every epoch was empty, and cycling a million of them looked like a hang.
    out = tmp_path / "plots" / "lr.png"
    result = twinray_here(
        capsys, "lr-find", "--data", covid_packed, "--out", out, "--size", "32", "--batch-size", batch
    )
    assert_one_line_error(result, f"--batch-size {batch}", needle)
    assert not out.parent.exists()
