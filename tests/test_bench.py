"""The benchmark scripts run end to end on the CPU and write their JSON to the results folder and where asked
(timings are not asserted). TWINRAY_BENCH_RESULTS points the results folder at a tmp dir here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def bench(script, *args, record) -> subprocess.CompletedProcess:
    """Runs a benchmark with its results folder at `record` (never the committed bench/results/)."""
    env = {**os.environ, "TWINRAY_BENCH_RESULTS": str(record)}
    return subprocess.run(
        [sys.executable, f"bench/{script}", *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env
    )


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
    tiny = ["--size", "32", "--batch-sizes", "8", "--steps", "2", "--warmup", "1", "--json", out]
    speed = ["--data", covid_packed, "--device", "cpu", "--backends", "native", "--configs", "a,b", *tiny]
    result = bench("train_speed.py", *speed, record=record)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    expected = {("a", "synthetic"), ("a", "baseline"), ("b", "synthetic"), ("b", "native")}
    assert {(r["config"], r["source"]) for r in rows} == expected
    assert all(r["images_per_s"] > 0 for r in rows)
    assert (record / "train_speed-cpu.json").is_file()
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
    assert all(r["images_per_s_read"] > 0 for r in rows.values())
    result = bench("ffcv_fields.py", "--data", constant_data, "--json", tmp_path / "mixed.json", record=tmp_path)
    assert result.returncode == 1 and "sizes" in result.stderr and "Traceback" not in result.stderr
