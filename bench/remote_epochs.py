"""Whole epochs of a dataset at a URL, through the shard cache, beside the same files in a local directory.

`bench/pipeline.py --data s3://...` runs this instead of its fixed-batch rows. Per backend:

- **cold**: the first epoch from an empty shard cache (a new temporary one). Its time includes every download; the
  shards of the split download in background threads while the loader reads those already there. `first_batch_s`
  is the wait for the first batch, `download_span_s` the time from the first shard download's start to the last
  one's end (fetch.log), `download_s` the summed download times (downloads run 4 at a time).
- **warm**: later epochs, reading the filled cache.
- **local**: the same epochs over a plain copy of the cached files (an ordinary packed directory).

Warm and local epochs alternate, so that both see the same machine; each reports the median of its epochs, and
`warm_vs_local` is their ratio in pairs/s within this one run (1.0: the cache costs nothing once filled).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from twinray.pipelines import LoaderSettings, build_loader
from twinray.prep import shard_cache
from twinray.prep.shard_cache import CacheSettings


def _epoch(loader, epoch: int, device) -> tuple[float, float, int]:
    """(seconds for the whole epoch, seconds to its first batch, pairs)."""
    loader.set_epoch(epoch)
    start = time.perf_counter()
    first, pairs = None, 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        pairs += batch.views[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, first or 0.0, pairs


def _plain_copy(cached: Path, folder: Path) -> Path:
    """The cached dataset as an ordinary packed directory: its files, without the cache's own."""
    skip = {shard_cache.MARKER, shard_cache.LOG, ".locks", "ffcv"}
    shutil.copytree(cached, folder, ignore=lambda _, names: [n for n in names if n in skip or n.endswith(".part")])
    return folder


def run(url: str, backends: list[str], epochs: int, settings: LoaderSettings, device, storage_options=None) -> dict:
    """{backend: {cold, warm, local, warm_vs_local, ...}} over `epochs` epochs (at least 2) of the train split;
    `settings` the loaders' (their device and shard cache set here)."""
    results = {}
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="twinray-bench-cache-") as work:
            cache = CacheSettings(Path(work) / "cache", None, storage_options)
            remote = build_loader(url, replace(settings, device=device, shard_cache=cache), backend=backend)
            seconds, first, pairs = _epoch(remote, 0, device)
            events = [e for e in shard_cache.read_log(remote.data.root) if e["event"] == "fetch"]
            shards = [e for e in events if e["file"].endswith(".tar")]
            span = max(e["time"] for e in shards) - min(e["time"] - e["seconds"] for e in shards) if shards else 0
            local = build_loader(
                str(_plain_copy(remote.data.root, Path(work) / "local")),
                replace(settings, device=device),
                backend=backend,
            )
            warm, plain = [], []
            for epoch in range(1, epochs):  # alternating, so both see the same machine
                warm.append(_epoch(remote, epoch, device))
                plain.append(_epoch(local, epoch, device))
        warm_rate = statistics.median(p / s for s, _, p in warm)
        local_rate = statistics.median(p / s for s, _, p in plain)
        results[backend] = {
            "cold": {
                "pairs_per_s": round(pairs / seconds, 1),
                "seconds": round(seconds, 3),
                "first_batch_s": round(first, 3),
                "download_span_s": round(span, 3),
                "download_s": round(sum(e["seconds"] for e in shards), 3),
                "shards": len(shards),
            },
            "warm": {"pairs_per_s": round(warm_rate, 1), "epochs": len(warm)},
            "local": {"pairs_per_s": round(local_rate, 1), "epochs": len(plain)},
            "warm_vs_local": round(warm_rate / local_rate, 3),
            "cold_vs_local": round(pairs / seconds / local_rate, 3),
            "pairs_per_epoch": pairs,
        }
        row = results[backend]
        print(
            f"{backend:<8} cold {row['cold']['pairs_per_s']:>8.1f} pairs/s (first batch after "
            f"{first:.2f} s, {len(shards)} shards downloaded over {span:.2f} s)  warm {warm_rate:>8.1f}  "
            f"local {local_rate:>8.1f}  warm/local {row['warm_vs_local']:.3f}"
        )
    return results
