"""What the shard cache's check that a cached shard is unchanged costs (prep/shard_cache.py), beside hashing it.

    python bench/shard_check.py [--shards 64] [--shard-mb 8] [--repeat 200]

Builds a synthetic packed dataset of `--shards` shards of `--shard-mb` MB (random bytes), serves it from a file://
URL through a fresh shard cache, fetches it, then times:

- `check_us`: one open of a cached shard by a process new to it (`Remote.ensure`: a stat, the shard's record read
  and compared); `check_known_us`: the same by a process that has read the record before (a stat).
- `sha256_mb_s`: hashing a cached shard (hashlib, 1 MiB blocks), the cost of a full check per byte read.

and prints them with what they come to per epoch: every DataLoader worker process opens each shard of the split it
reads, so an epoch costs `shards x workers` checks, against `shards x workers x shard size` bytes hashed if every
open hashed the shard.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from twinray.bench.report import device_name
from twinray.bench.report import save as report_save
from twinray.cli import OneLineParser, run_cli
from twinray.prep.format import PackWriter, sha256_file
from twinray.prep.open_dataset import open_dataset
from twinray.prep.shard_cache import CacheSettings


def synthetic(out: Path, shards: int, shard_mb: float) -> Path:
    """A packed dataset of `shards` train shards, each one member of `shard_mb` MB of random bytes."""
    rng = np.random.default_rng(0)
    writer = PackWriter(out, "synthetic", "multiclass", ["a", "b"], "png", 32, shard_samples=1)
    for k in range(shards):
        writer.add("train", rng.bytes(int(shard_mb * 1e6)), 32, 32, {"label": k % 2})
    writer.finish({"skipped": []})
    return out


def measure(shards: int, shard_mb: float, repeat: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        data = synthetic(Path(work) / "packed", shards, shard_mb)
        remote = open_dataset(f"file://{data}", CacheSettings(Path(work) / "cache", None, {})).remote
        remote.fetch_all()
        names = list(remote.sizes)
        fresh, known = [], []
        for k in range(repeat):
            name = names[k % len(names)]
            remote._records.clear()  # as a process new to the shard: reads its record
            start = time.perf_counter()
            remote.ensure(name)
            fresh.append(time.perf_counter() - start)
            start = time.perf_counter()
            remote.ensure(name)
            known.append(time.perf_counter() - start)
        path = remote.root / names[0]
        start = time.perf_counter()
        for name in names[: max(1, min(len(names), 8))]:
            sha256_file(remote.root / name)
        hashed = max(1, min(len(names), 8)) * path.stat().st_size / 1e6
        mb_s = hashed / (time.perf_counter() - start)
    check_us = statistics.median(fresh) * 1e6
    epoch_mb = shards * shard_mb * workers
    return {
        "shards": shards,
        "shard_mb": shard_mb,
        "workers": workers,
        "check_us": round(check_us, 1),
        "check_known_us": round(statistics.median(known) * 1e6, 1),
        "sha256_mb_s": round(mb_s),
        "per_epoch_check_ms": round(check_us * shards * workers / 1e3, 2),
        "per_epoch_hash_all_s": round(epoch_mb / mb_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=64, help="shards in the synthetic split (64)")
    parser.add_argument("--shard-mb", type=float, default=8.0, help="MB per shard (8)")
    parser.add_argument("--repeat", type=int, default=200, help="timed opens (200)")
    parser.add_argument("--workers", type=int, default=8, help="loader processes per epoch, for the totals (8)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = {
        "benchmark": "shard_check",
        "date": date.today().isoformat(),
        "device": device_name("cpu"),  # a stat and a hash: the host's disk and CPU, whatever the accelerator
        **measure(args.shards, args.shard_mb, args.repeat, args.workers),
    }
    report_save(report, "shard_check-cpu", args.json)
    return 0


if __name__ == "__main__":
    run_cli(main, "shard_check")
