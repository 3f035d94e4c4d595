"""train/scan.py: a pretraining sweep with finetunes after it, a fraction x init grid over seeds, and resuming."""

from __future__ import annotations

import csv
import subprocess

import pytest
import yaml

from tests.conftest import assert_one_line_error, twinray_here
from twinray.train.config import FinetuneConfig, PretrainConfig, to_flags
from twinray.train.scan import plan, t_interval

FINETUNE = {"epochs": 1, "size": 32, "batch_size": 16, "workers": 1}


def scan(capsys, config) -> subprocess.CompletedProcess:
    """`twinray scan CONFIG` in this process (tests/conftest.py twinray_here); each run in it is still a process."""
    return twinray_here(capsys, "scan", config)


def test_flags_and_interval():
    config = PretrainConfig(batch_size=8, compile=False, deterministic=True)
    assert to_flags(config) == ["--batch-size", "8", "--no-compile", "--deterministic"]  # defaults left out
    tune = FinetuneConfig(data="d", init="random", out="o", fraction=0.1)
    assert to_flags(tune) == ["--data", "d", "--init", "random", "--out", "o", "--fraction", "0.1"]
    assert t_interval([1.0]) == 0.0
    assert t_interval([1.0, 2.0, 3.0]) == pytest.approx(4.303 * 1.0 / 3**0.5, rel=1e-3)  # t(0.975, 2) = 4.303


def test_a_sweep_pretrains_once_per_pretraining_cell_and_varies_finetune_keys_after_it():
    cfg = {"data": "d", "out": "o", "seeds": [0], "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
           "grid": {"lambd": [0.005, 0.01], "fraction": [0.1, 1.0]}, "then": ["linear"]}  # fmt: skip
    runs = plan(cfg)
    pretrains = [r for r in runs if r["kind"] == "pretrain"]
    assert len(pretrains) == 2 and all("--fraction" not in r["args"] for r in pretrains)
    tunes = [r for r in runs if r["kind"] == "finetune"]
    assert len(tunes) == 4 and len({str(r["dir"]) for r in tunes}) == 4
    for tune in tunes:
        args = tune["args"]
        assert args[args.index("--fraction") + 1] == str(tune["cell"]["fraction"]) and "--lambd" not in args
        assert args[args.index("--init") + 1].endswith(f"lambd-{tune['cell']['lambd']}/seed-0/pretrain")


@pytest.mark.slow
def test_pretrain_sweep_then_fraction_grid_resumes(covid_packed, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    pretrain = {"epochs": 1, "size": 32, "batch_size": 16, "workers": 1}
    sweep.write_text(yaml.safe_dump({
        "data": str(covid_packed), "out": str(tmp_path / "sweep"), "seeds": [0],
        "pretrain": pretrain, "finetune": FINETUNE, "grid": {"projector": ["64"]}, "then": ["linear", "freeze:2"],
    }, sort_keys=False))  # fmt: skip
    result = scan(capsys, sweep)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "runs.csv")))
    assert sorted(r["mode"] for r in rows) == ["freeze:2", "linear"] and all(r["projector"] == "64" for r in rows)
    backbone = tmp_path / "sweep" / "projector-64" / "seed-0" / "pretrain"
    assert (backbone / "backbone.safetensors").is_file()

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "data": str(covid_packed), "out": str(tmp_path / "grid"), "seeds": [0, 1], "finetune": FINETUNE,
        "grid": {"init": [str(backbone), "random"], "fraction": [0.5]},
    }, sort_keys=False))  # fmt: skip
    result = scan(capsys, grid)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "grid" / "runs.csv")))
    assert len(rows) == 4 and {r["seed"] for r in rows} == {"0", "1"}
    summary = list(csv.DictReader(open(tmp_path / "grid" / "summary.csv")))
    assert len(summary) == 2 and all(s["seeds"] == "2" and float(s["accuracy_ci95"]) >= 0 for s in summary)
    assert (tmp_path / "grid" / "scan.png").stat().st_size > 5000

    (tmp_path / "grid" / "init-random_fraction-0.5" / "seed-1" / "results.json").unlink()  # as if interrupted
    result = scan(capsys, grid)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 runs, 3 already finished" in result.stdout and result.stdout.count(" skip ") == 3
    assert len(list(csv.DictReader(open(tmp_path / "grid" / "runs.csv")))) == 4


def test_bad_scans_are_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("data: x\nout: y\ngrid: {fraction: [0.1]}\nseed: [1]\n")
    assert_one_line_error(scan(capsys, path), "unknown key 'seed'")
    path.write_text("data: x\nout: y\ngrid: {fraction: 0.1}\n")
    assert_one_line_error(scan(capsys, path), "non-empty list")
    path.write_text(f"data: {tmp_path}\nout: {tmp_path / 'o'}\ngrid: {{fraction: [2]}}\nfinetune: {{init: random}}\n")
    assert_one_line_error(scan(capsys, path), "finetune in", "fraction 2")
