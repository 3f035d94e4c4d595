"""The benchmark scripts run end to end on the CPU and write their JSON to the results folder and where asked
(timings are not asserted). TWINRAY_BENCH_RESULTS points the results folder at a tmp dir here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from twinray.prep.format import PackedDataset


def bench(script, *args, record) -> subprocess.CompletedProcess:
    """Runs a benchmark with its results folder at `record` (never the committed bench/results/)."""
    env = {**os.environ, "TWINRAY_BENCH_RESULTS": str(record)}
    return subprocess.run(
        [sys.executable, f"bench/{script}", *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env
    )


@pytest.mark.slow
def test_pipeline_and_train_speed_write_their_json_where_asked(covid_packed, tmp_path):
    results = REPO / "bench" / "results"
    committed = {p: p.read_bytes() for p in results.glob("*.json")}
    out = tmp_path / "pipeline.json"
    record = tmp_path / "record"
    result = bench("pipeline.py", "--data", covid_packed, "--device", "cpu", "--backends", "native,baseline",
                   "--caches", "none,host", "--size", "32", "--batch-size", "8", "--batches", "2", "--warmup", "1",
                   "--json", out, record=record)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert json.loads((record / "pipeline-cpu.json").read_text()) == report  # the copy in the results folder
    assert set(report["results"]) == {"native", "native-host", "baseline"}
    assert report["results"]["baseline"]["vs_baseline"] == 1.0
    cached = report["results"]["native-host"]
    assert cached["cache"] == "host" and cached["fill_s"] > 0 and "cache" not in report["results"]["native"]
    out = tmp_path / "train_speed.json"
    # 48 train images at batch 16: 3 steps an epoch, so the warm-up step and 3 timed ones run past an epoch's end.
    tiny = ["--size", "32", "--batch-sizes", "16", "--steps", "3", "--warmup", "1", "--json", out]
    speed = ["--data", covid_packed, "--device", "cpu", "--backends", "native", "--configs", "a,c", *tiny]
    result = bench("train_speed.py", *speed, record=record)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu: ") and report["torch"] == torch.__version__
    rows = report["results"]
    expected = {("a", "synthetic"), ("a", "baseline"), ("c", "synthetic"), ("c", "native")}
    assert {(r["config"], r["source"]) for r in rows} == expected
    # Each rate rests on the timed steps alone (the warm-up's images left out), each a full batch, and every
    # source, loaders included, kept going into its next epoch.
    assert all(r["images"] == 3 * 16 and r["compile_mode"] is None for r in rows)
    assert all(0 <= r["data_wait"] <= 1 for r in rows)
    assert json.loads((record / "train_speed-cpu.json").read_text()) == report
    assert committed == {p: p.read_bytes() for p in results.glob("*.json")}  # the record went to tmp


def test_ffcv_fields_compares_the_three_layouts(covid_packed, constant_data, tmp_path):
    out = tmp_path / "fields.json"
    result = bench("ffcv_fields.py", "--data", covid_packed, "--batch-size", "8", "--json", out, record=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert list(rows) == ["grey-ndarray (the ffcv backend's)", "rgb-jpg (q90)", "rgb-raw"]
    assert rows["grey-ndarray (the ffcv backend's)"]["mean_abs_pixel_error"] == 0.0  # lossless, one channel
    assert rows["rgb-raw"]["mean_abs_pixel_error"] == 0.0 and rows["rgb-jpg (q90)"]["mean_abs_pixel_error"] > 0
    assert rows["rgb-raw"]["megabytes"] > rows["grey-ndarray (the ffcv backend's)"]["megabytes"]  # 3 channels
    train = len(PackedDataset(covid_packed).indices("train"))
    assert all(r["images_read"] == train for r in rows.values())  # each rate is over one whole pass, every image
    result = bench("ffcv_fields.py", "--data", constant_data, "--json", tmp_path / "mixed.json", record=tmp_path)
    assert result.returncode == 1 and "sizes" in result.stderr and "Traceback" not in result.stderr


def test_train_speed_ratios_name_each_comparison():
    """The headline figures: twinray's default (d, compile mode default) over the study's (a), each end-to-end
    source over d's ceiling with its projected 300 COVID epochs, and each other compile mode over the default."""
    from twinray.bench.train_speed import ratios

    def row(config, mode, source, images_per_s, batch=128):
        return dict(config=config, compile_mode=mode, source=source, batch_size=batch, images_per_s=images_per_s)

    rows = [
        row("a", None, "synthetic", 2000.0),
        row("a", None, "baseline", 150.0),
        row("d", "default", "synthetic", 6000.0),
        row("d", "default", "native", 5400.0),
        row("d", "default", "native-device", 5880.0),
        row("d", "reduce-overhead", "synthetic", 6600.0),
        row("d", "default", "native", 5000.0, batch=256),  # no ceiling at 256: no ratio
    ]
    assert ratios(rows) == {
        "d_over_a_synthetic_b128": 3.0,
        "native_end_to_end_over_ceiling_b128": 0.9,
        "minutes_300_epochs_covid_native_d_b128": pytest.approx(19.6),  # 300 x 21,165 / 5,400 / 60
        "native-device_end_to_end_over_ceiling_b128": 0.98,
        "minutes_300_epochs_covid_native-device_d_b128": pytest.approx(18.0),
        "reduce-overhead_over_default_b128": 1.1,
    }
