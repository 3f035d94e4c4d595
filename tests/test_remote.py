"""Packed datasets at a URL: `prep --out URL`, reading through the node-local shard cache, and their errors.

Everything runs against a real S3-compatible HTTP server on 127.0.0.1 (the `s3` fixture, tests/s3server.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, assert_one_line_error, twinray_here
from twinray.cli import InputError
from twinray.pipelines import LoaderSettings, build_loader
from twinray.prep import shard_cache
from twinray.prep.format import MANIFEST, PackedDataset
from twinray.prep.open_dataset import open_dataset
from twinray.prep.shard_cache import CacheSettings
from twinray.storage import is_url, location, upload_dataset

PLAIN = "base"


@pytest.fixture
def cache(tmp_path, s3) -> CacheSettings:
    """A fresh shard cache for one test, set for the test server: what a test opens its URLs with."""
    return CacheSettings(tmp_path / "shard-cache", None, s3.storage_options)


def prep_cli(*args, cwd=REPO, env=None) -> subprocess.CompletedProcess:
    """`python -m twinray.prep ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "twinray.prep", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_urls_are_told_from_paths():
    assert is_url("s3://bucket/covid") and is_url("gs://b/x") and is_url("file:///data/x")
    assert not is_url("data/packed/covid") and not is_url("C:/data") and not is_url(Path("s3:/bucket"))
    assert location("s3://bucket/covid") == "s3://bucket/covid"  # not Path's "s3:/bucket/covid"
    assert location("runs/x") == Path("runs/x")


def test_a_url_without_its_extra_is_one_line_naming_the_extra_and_writes_nothing_local(covid_sample, tmp_path):
    # gcsfs is not installed (the test extras bring s3fs only): the same path a missing s3fs would take.
    result = prep_cli("covid", "--src", covid_sample, "--out", "gs://bucket/covid", cwd=tmp_path)
    assert_one_line_error(result, "gs://bucket/covid", "gcsfs", "pip install 'twinray[gcs]'")
    assert list(tmp_path.iterdir()) == []  # no local folder named `gs:`
    result = prep_cli("verify", "az://container/covid", cwd=tmp_path)
    assert_one_line_error(result, "adlfs", "twinray[azure]")
    result = prep_cli("covid", "--src", "s3://bucket/raw", "--out", tmp_path / "x", cwd=tmp_path)
    assert_one_line_error(result, "s3://bucket/raw", "a URL; this takes a local path")


def test_prep_out_s3_uploads_the_same_bytes_as_a_local_build(s3, s3_covid, covid_packed, covid_sample):
    fs = s3.filesystem()
    remote = {Path(p).name: fs.cat_file(p) for p in fs.ls(s3_covid.removeprefix("s3://"))}
    local = {p.name: p.read_bytes() for p in covid_packed.iterdir() if p.is_file()}
    assert remote == local  # every shard, DALI index, index.npy and manifest, byte for byte
    again = prep_cli(
        "covid", "--src", covid_sample, "--out", s3_covid, "--workers", "1", "--shard-samples", "16",
        "--storage-options", s3.storage_options_json, env=s3.env(),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "already packed" in again.stdout and s3_covid in again.stdout


def test_the_upload_sends_the_manifest_last(covid_packed, tmp_path):
    # file:// runs the same upload code; its mtimes (ns) show the order in which the files arrived.
    url = f"file://{tmp_path}/up"
    upload_dataset(covid_packed, url)
    up = tmp_path / "up"
    files = sorted((p for p in up.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    assert files[-1] == up / MANIFEST
    # Every file under the packed folder, side folders too (another test may have added FFCV files beside it).
    sent = sorted(p.relative_to(up) for p in files)
    assert sent == sorted(p.relative_to(covid_packed) for p in covid_packed.rglob("*") if p.is_file())
    assert open_dataset(url).manifest == PackedDataset(covid_packed).manifest


def test_prep_verify_and_info_of_a_url(s3, s3_covid, tmp_path):
    options = ["--storage-options", s3.storage_options_json, "--shard-cache", tmp_path / "cache"]
    info = prep_cli("info", s3_covid, *options, env=s3.env())
    assert info.returncode == 0, info.stderr
    assert f"in {s3_covid}" in info.stdout and "train 48 / val 6 / test 6" in info.stdout
    fetched = [e["file"] for e in shard_cache.read_log(next((tmp_path / "cache").iterdir()))]
    assert fetched == ["index.npy"]  # info needs no shard
    verify = prep_cli("verify", s3_covid, *options, env=s3.env())
    assert verify.returncode == 0, verify.stderr
    assert "5 shards and the index match their sha256" in verify.stdout and f"ok: {s3_covid}" in verify.stdout


@pytest.mark.parametrize("backend", ["native", "dali", "ffcv"])
def test_each_backend_reads_a_url_as_it_reads_the_local_directory(s3_covid, covid_packed, cache, backend):
    settings = LoaderSettings(batch_size=8, recipe=PLAIN, size=32, seed=3, workers=1)
    remote = build_loader(s3_covid, replace(settings, shard_cache=cache), backend=backend)
    assert remote.data.root.is_relative_to(cache.directory) and remote.data.location == s3_covid
    local = build_loader(covid_packed, settings, backend=backend)
    remote.set_epoch(1)
    local.set_epoch(1)
    pairs = list(zip(remote, local, strict=True))
    assert len(pairs) == 6  # 48 train images, batch 8
    for a, b in pairs:
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        for va, vb in zip(a.views, b.views):
            assert torch.equal(va, vb)
    names = {e["file"] for e in shard_cache.read_log(remote.data.root) if e["event"] == "fetch"}
    assert {"train-00000.tar", "train-00001.tar", "train-00002.tar"} <= names


def test_a_damaged_remote_shard_is_caught_by_its_sha256(s3, covid_packed, cache, tmp_path):
    url = "s3://twinray/damaged"
    upload_dataset(covid_packed, url, s3.storage_options)
    fs = s3.filesystem()
    shard = fs.cat_file("twinray/damaged/train-00001.tar")
    fs.pipe_file("twinray/damaged/train-00001.tar", shard[:5000] + bytes([shard[5000] ^ 1]) + shard[5001:])
    result = prep_cli(
        "verify", url, "--shard-cache", tmp_path / "cli-cache", "--storage-options", s3.storage_options_json,
        env=s3.env(),
    )  # fmt: skip
    assert_one_line_error(result, f"{url}/train-00001.tar", "sha256 does not match the manifest in 2 downloads")
    # Reading it through a loader: the same line, and the bad copy never reaches the cache.
    with pytest.raises(InputError, match="train-00001.tar: sha256 does not match"):
        for _ in build_loader(
            url, LoaderSettings(batch_size=8, recipe=PLAIN, size=16, seed=0, workers=1, shard_cache=cache)
        ):
            pass
    local = open_dataset(url, cache).root
    attempts = [e for e in shard_cache.read_log(local) if e["file"] == "train-00001.tar"]
    assert [(e["attempt"], e["ok"]) for e in attempts] == [(1, False), (2, False)]  # fetched again once, no more
    assert not (local / "train-00001.tar").exists() and not list(local.glob(".*.part"))


def test_a_read_fetches_the_shard_it_needs_without_waiting_for_the_split(s3_covid, cache):
    data = open_dataset(s3_covid, cache)  # no split opened yet, so nothing queued in the background
    last_val_row = int(np.flatnonzero(data.index["split"] == 1)[-1])
    assert data.image(last_val_row).shape == (256, 256)
    fetched = [e["file"] for e in shard_cache.read_log(data.root) if e["event"] == "fetch"]
    assert fetched == ["index.npy", "val-00000.tar"]  # that one shard, not the dataset


def test_a_cached_copy_cut_short_is_fetched_again(s3_covid, cache):
    data = open_dataset(s3_covid, cache)
    data.remote.fetch_all()
    path = data.root / "val-00000.tar"
    path.write_bytes(path.read_bytes()[:1000])
    fresh = open_dataset(s3_covid, cache)  # another process would see the same: the size differs from the store's
    fresh.remote._ready.clear()
    image = fresh.image(int(fresh.indices("val")[0]))
    assert image.shape == (256, 256) and path.stat().st_size == data.remote.sizes["val-00000.tar"]
    events = [e["event"] for e in shard_cache.read_log(data.root) if e["file"] == "val-00000.tar"]
    assert events == ["fetch", "refetch", "fetch"]


def test_a_missing_bucket_is_one_clear_line(s3, covid_sample, tmp_path):
    options = ["--storage-options", s3.storage_options_json]
    result = prep_cli("verify", "s3://no-such-bucket/covid", *options, "--shard-cache", tmp_path, env=s3.env())
    assert_one_line_error(result, "s3://no-such-bucket/covid", "bucket 'no-such-bucket' does not exist")
    result = prep_cli("covid", "--src", covid_sample, "--out", "s3://no-such-bucket/covid", *options, env=s3.env())
    assert_one_line_error(result, "bucket 'no-such-bucket' does not exist")
    result = prep_cli("info", "s3://twinray/nothing-here", *options, "--shard-cache", tmp_path, env=s3.env())
    assert_one_line_error(result, "s3://twinray/nothing-here", "no manifest.json there")


RANK = textwrap.dedent(
    """
    import sys, time
    from twinray.prep.open_dataset import open_dataset
    from twinray.prep.shard_cache import CacheSettings
    url, cache, options, start = sys.argv[1:5]
    settings = CacheSettings(cache, None, options)
    time.sleep(max(0.0, float(start) - time.time()))  # both ranks open the dataset at the same moment
    data = open_dataset(url, settings)
    data.indices("train")  # queues the split for the background threads, as a loader does
    rows = range(len(data))
    print(sum(int(data.image(i).sum()) for i in rows))
    """
)


def test_local_ranks_download_each_shard_once(s3, s3_covid, tmp_path):
    import time

    cache = tmp_path / "node-cache"
    start = str(time.time() + 4)  # both processes have imported by then
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, s3_covid, str(cache), s3.storage_options_json, start],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=s3.env(),
        )
        for _ in range(2)
    ]
    outputs = [r.communicate(timeout=120) for r in ranks]
    assert all(r.returncode == 0 for r in ranks), [err[-2000:] for _, err in outputs]
    assert outputs[0][0] == outputs[1][0]  # both read the same pixels
    local = next(cache.iterdir())
    fetches = [e for e in shard_cache.read_log(local) if e["event"] == "fetch"]
    names = sorted(e["file"] for e in fetches)
    assert names == sorted(["index.npy", *json.loads((local / MANIFEST).read_text())["shards"]])  # each once
    assert {e["pid"] for e in fetches} <= {r.pid for r in ranks}


EVICT = textwrap.dedent(
    """
    import sys
    from twinray.prep.open_dataset import open_dataset
    from twinray.prep.shard_cache import CacheSettings
    url, cache, options, limit, split = sys.argv[1:6]
    data = open_dataset(url, CacheSettings(cache, limit, options))
    rows = data.indices(split)
    print(sum(int(data.image(int(i)).sum()) for i in rows))
    """
)


def test_the_cache_evicts_the_least_recently_used_and_refuses_a_split_too_large(s3, s3_covid, covid_packed, tmp_path):
    second = "s3://twinray/covid-copy"
    upload_dataset(covid_packed, second, s3.storage_options)
    sizes = {p.name: p.stat().st_size for p in covid_packed.glob("*.tar")}
    train = sum(v for k, v in sizes.items() if k.startswith("train-"))
    limit = train + sizes["val-00000.tar"] + 1000  # one train split and a little: the second's must evict
    cache = tmp_path / "cache"

    def run(url, split, limit=limit):
        return subprocess.run(
            [sys.executable, "-c", EVICT, url, str(cache), s3.storage_options_json, str(limit), split],
            capture_output=True,
            text=True,
            env=s3.env(),
        )

    assert run(s3_covid, "val").returncode == 0  # oldest
    assert run(s3_covid, "train").returncode == 0
    first = run(second, "train")
    assert first.returncode == 0, first.stderr[-2000:]
    cached = list(cache.glob("*/*.tar"))
    assert sum(p.stat().st_size for p in cached) <= limit
    evicted = [e for d in cache.iterdir() for e in shard_cache.read_log(d) if e["event"] == "evict"]
    assert evicted and evicted[0]["file"] == "val-00000.tar"  # the least recently used went first
    assert {p.name for p in cached if p.parent.name.startswith("covid-copy")} == {
        k for k in sizes if k.startswith("train-")
    }
    too_small = run(second, "train", limit=train - 1)
    assert too_small.returncode == 1 and "Traceback" in too_small.stderr  # a script: the InputError's text
    assert "split 'train' is" in too_small.stderr and "more than the shard cache limit" in too_small.stderr


def test_a_url_split_too_large_for_the_cache_is_one_line_in_pretrain(s3, s3_covid, tmp_path, capsys):
    result = twinray_here(
        capsys, "pretrain", "--data", s3_covid, "--out", tmp_path / "run",
        "--shard-cache", tmp_path / "c", "--shard-cache-limit", "100kB",
        "--storage-options", s3.storage_options_json, "--wandb", "disabled", "--size", "32",
    )  # fmt: skip
    assert_one_line_error(result, "split 'train' is", "shard cache limit", "--shard-cache-limit")


@pytest.mark.slow
def test_finetune_gradcam_and_lr_find_read_a_url(s3, s3_covid, covid_packed, tmp_path, capsys):
    """In this process (twinray_here), where the s3 fixture has put the server's credentials in the environment."""
    storage = ["--shard-cache", tmp_path / "cache", "--storage-options", s3.storage_options_json]

    def tool(command, *args):
        return twinray_here(capsys, command, *args)

    small = ["--init", "random", "--mode", "linear", "--epochs", "1", "--size", "32", "--batch-size", "16"]
    remote = tool("finetune", "--data", s3_covid, *storage, *small, "--workers", "1", "--out", tmp_path / "ft")
    assert remote.returncode == 0, remote.stderr[-2000:]
    local = tool("finetune", "--data", covid_packed, *small, "--workers", "1", "--out", tmp_path / "ft-local")
    assert local.returncode == 0, local.stderr[-2000:]
    a, b = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("ft", "ft-local"))
    assert a["test"] == b["test"]  # the same data, so the same model and scores
    png = tmp_path / "cam.png"
    cam = tool("gradcam", "--data", s3_covid, *storage, "--models", tmp_path / "ft", "--per-class", "1", "--out", png)
    assert cam.returncode == 0, cam.stderr[-2000:]
    assert png.stat().st_size > 1000
    lr = tool("lr-find", "--data", s3_covid, *storage, "--steps", "4", "--batch-size", "8", "--size", "32",
              "--device", "cpu", "--out", tmp_path / "lr.png")  # fmt: skip
    assert lr.returncode == 0, lr.stderr[-2000:]
    assert json.loads((tmp_path / "lr.json").read_text())["data"] == s3_covid
    (local_copy,) = (tmp_path / "cache").iterdir()
    assert {p.name for p in local_copy.glob("*.tar")} == {p.name for p in covid_packed.glob("*.tar")}


def test_the_pipeline_bench_times_cold_warm_and_local_epochs_of_a_url(s3, s3_covid, tmp_path):
    out = tmp_path / "remote.json"
    result = subprocess.run(
        [
            sys.executable, "bench/pipeline.py", "--data", s3_covid, "--storage-options", s3.storage_options_json,
            "--backends", "native", "--epochs", "3", "--batch-size", "8", "--size", "32", "--json", out,
        ],
        cwd=REPO, capture_output=True, text=True,
        env={**s3.env(), "TWINRAY_BENCH_RESULTS": str(tmp_path / "results")},  # not the committed bench/results/
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["pipeline-remote-cpu.json"]
    row = json.loads(out.read_text())["results"]["native"]
    assert row["pairs_per_epoch"] == 48 and row["cold"]["shards"] == 3  # every train shard, downloaded once
    assert row["warm"]["epochs"] == row["local"]["epochs"] == 2
    assert 0 < row["cold"]["first_batch_s"] <= row["cold"]["seconds"]
    assert row["warm_vs_local"] == pytest.approx(row["warm"]["pairs_per_s"] / row["local"]["pairs_per_s"], abs=0.01)


def test_sizes_and_options_parse():
    assert shard_cache.parse_size("200GB") == 200 * 10**9 and shard_cache.parse_size("1.5KiB") == 1536
    assert shard_cache.parse_size(None) is None
    with pytest.raises(InputError, match="not a size"):
        shard_cache.parse_size("lots")
    from twinray.storage import parse_storage_options, without_secrets

    with pytest.raises(InputError, match="JSON object"):
        parse_storage_options("[1]")
    options = {"key": "AKIA", "client_kwargs": {"endpoint_url": "http://x", "aws_secret_access_key": "s"}}
    assert without_secrets(options) == {"client_kwargs": {"endpoint_url": "http://x"}}
    assert shard_cache.parse_size("7") == 7
