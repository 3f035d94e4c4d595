"""The LR range test: the suggestion rule, the sweep, and the CLI on both tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import assert_one_line_error, twinray_here
from twinray.train.lr_find import main, range_test, suggest


def test_suggestion_is_the_steepest_descent():
    lrs = [10 ** (-6 + 0.1 * k) for k in range(61)]
    centre = math.log(1e-3)
    losses = [1 - math.tanh(math.log(lr) - centre) for lr in lrs]  # steepest fall at 1e-3
    assert suggest(lrs, losses) == pytest.approx(1e-3, rel=0.3)


def test_sweep_rises_exponentially_and_stops_when_the_loss_explodes():
    w = torch.nn.Parameter(torch.tensor([3.0]))
    optimizer = torch.optim.SGD([w], lr=1e-6)

    def update():
        loss = (w**2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    lrs, losses = range_test(update, optimizer, 1e-4, 10.0, steps=200)
    assert lrs[0] == pytest.approx(1e-4) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert len(lrs) < 200  # at lr > 1, SGD on w^2 diverges and the sweep stops
    assert min(losses) < losses[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_cli_writes_plot_and_json(covid_packed, tmp_path, task, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / f"{task}.png"
    args = [
        "--data",
        str(covid_packed),
        "--task",
        task,
        "--out",
        str(out),
        "--steps",
        "12",
        "--batch-size",
        "8",
        "--size",
        "32",
        "--device",
        device,
    ]
    assert main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["task"] == task and len(result["lrs"]) == len(result["losses"]) > 0
    assert result["suggested_lr"] in result["lrs"]  # a lr the sweep tried, not one outside it
    assert out.stat().st_size > 1000


def test_bad_arguments_are_one_line(covid_packed, tmp_path, capsys):
    def run(*args):
        return twinray_here(capsys, "lr-find", *args)

    out = str(tmp_path / "x.png")
    assert_one_line_error(run("--data", str(covid_packed), "--out", out, "--task", "segment"), "--task", "segment")
    assert_one_line_error(
        run("--data", str(covid_packed), "--out", out, "--min-lr", "1", "--max-lr", "0.1"), "--min-lr"
    )
    assert_one_line_error(run("--data", str(tmp_path / "nope"), "--out", out), "nope")
