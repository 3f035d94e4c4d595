"""bench/resources.py on a tiny CPU grid: every cell recorded, OOM caught as a grey cell, plots drawn."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import cv2
import pytest

from tests.conftest import REPO, assert_one_line_error, twinray_here
from twinray.bench.resources import hours_for_epochs


@pytest.mark.slow
def test_tiny_cpu_grid_records_every_cell_and_survives_oom(tmp_path):
    out = tmp_path / "grid"
    cmd = [
        sys.executable,
        "bench/resources.py",
        "--device",
        "cpu",
        "--resolutions",
        "32,256",
        "--batch-sizes",
        "2,64",
        "--backbones",
        "resnet18",
        "--channels",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--memory-cap",
        "400MiB",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "cells.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {(r["resolution"], r["batch_size"]) for r in rows} == {
        ("32", "2"),
        ("32", "64"),
        ("256", "2"),
        ("256", "64"),
    }
    by_cell = {(int(r["resolution"]), int(r["batch_size"])): r for r in rows}
    assert by_cell[(256, 64)]["status"] == "oom"  # 256 px x 64 x 2 views does not fit in 400 MiB
    small = by_cell[(32, 2)]
    assert small["status"] == "ok" and float(small["step_s"]) > 0 and float(small["peak_memory_mb"]) > 0
    hours = hours_for_epochs(float(small["step_s"]), 21165, 2, epochs=100)  # checked on its own below
    assert float(small["hours_per_100_epochs"]) == pytest.approx(hours, abs=0.001)
    report = json.loads((out / "cells.json").read_text())
    assert (
        report["device"].startswith("cpu") and len(report["cells"]) == 4 and report["memory_cap_bytes"] == 400 * 2**20
    )
    for png in ("heatmaps.png", "memory.png"):
        image = cv2.imread(str(out / png))
        assert image is not None and image.shape[0] > 100
    heat = cv2.imread(str(out / "heatmaps.png"))
    grey = (abs(heat[..., 0].astype(int) - 211) < 3) & (abs(heat[..., 1].astype(int) - 211) < 3)
    assert grey.sum() > 1000  # the OOM cell is drawn in light grey


def test_hours_per_100_epochs_matches_the_studys_figure_and_counts_a_partial_batch():
    # The study: 15 h for 300 epochs of 21,165 images at batch 128, i.e. 5 h per 100 epochs of 166 steps (165 full
    # batches and one of 45 images), i.e. 1.0843 s per step.
    assert hours_for_epochs(1.0843, 21165, 128, epochs=100) == pytest.approx(5.0, abs=0.001)
    assert hours_for_epochs(1.0843, 21165, 128, epochs=300) == pytest.approx(15.0, abs=0.003)
    assert hours_for_epochs(36.0, 10, 5, epochs=100) == pytest.approx(2.0)  # 2 steps an epoch
    assert hours_for_epochs(36.0, 11, 5, epochs=100) == pytest.approx(3.0)  # 11 images: a third step, of one


def test_compare_plot_draws_both_settings_and_skips_oom(tmp_path):
    from twinray.bench.resources import draw_compare

    def cells(hours):
        return [{"batch_size": b, "status": "ok" if h else "oom", "hours_per_100_epochs": h} for b, h in hours]

    result = {
        "study": {
            "precision": "fp32",
            "compile": False,
            "largest_batch_that_fits": 64,
            "cells": cells([(64, 10.0), (128, None)]),
        },
        "twinray": {
            "precision": "bf16",
            "compile": True,
            "largest_batch_that_fits": 128,
            "cells": cells([(64, 4.0), (128, 3.5)]),
        },
    }
    image = cv2.imread(str(draw_compare(result, tmp_path)))
    assert image is not None and image.shape[1] > 300


def test_a_cell_over_its_time_limit_is_recorded_not_raised():
    from twinray.bench.resources import run_isolated

    cell = dict(device="cpu", memory_cap=0, dataset_size=100, steps=2, warmup=1, backbone="resnet18", channels=1)
    row = run_isolated({**cell, "resolution": 32, "batch_size": 2, "precision": "fp32", "compile": False}, timeout=1)
    assert (row["status"], row["backbone"], row["batch_size"]) == ("timeout", "resnet18", 2)  # importing torch > 1 s


@pytest.mark.parametrize(
    "script, args, needle",
    [
        ("bench/resources.py", ["--resolutions", "1,abc"], "'1,abc' is not a comma-separated list of whole numbers"),
        ("bench/resources.py", ["--batch-sizes", "0,64"], "'0,64': every entry must be at least 1"),
        ("bench/train_speed.py", ["--batch-sizes", "x"], "'x' is not a comma-separated list of whole numbers"),
        ("bench/pipeline.py", ["--data", "/no/such/folder"], "/no/such/folder: no such directory"),
    ],
)
def test_benchmark_scripts_report_bad_input_in_one_line(script, args, needle, capsys):
    """A benchmark's bad argument or missing data folder is one line naming it, exit code 2, never a traceback
    (`twinray bench NAME`, in this process)."""
    result = twinray_here(capsys, "bench", script.removeprefix("bench/").removesuffix(".py"), *args)
    assert_one_line_error(result, needle)
