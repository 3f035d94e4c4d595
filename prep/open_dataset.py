"""Opening a packed dataset by where it is: a local directory, or a URL (`s3://`, `gs://`, `az://`, `file://`)
resolved to local files through the node-local shard cache (prep/shard_cache.py) with the cache settings the caller
passes. This is the layer that turns a location into local paths; the reader, PackedDataset (prep/format.py), only
ever sees local paths, and the shard cache holds no settings of its own."""

from __future__ import annotations

from pathlib import Path

from twinray.prep import shard_cache
from twinray.prep.format import PackedDataset
from twinray.prep.shard_cache import CacheSettings
from twinray.storage import is_url


def open_dataset(location: str | Path, cache: CacheSettings | None = None) -> PackedDataset:
    """The packed dataset at `location`. A URL is read through the shard cache (`cache`: its directory, size limit
    and storage options; None for the defaults and the environment): its manifest and index are fetched now, its
    shards as they are needed. A local directory that is a cache's copy of a URL dataset (a worker reopening
    `data.root`) fetches its shards in the same way. Raises InputError in one line for a directory or URL that
    does not hold a packed dataset."""
    local = shard_cache.resolve(str(location), cache) if is_url(location) else Path(location)
    remote = shard_cache.attached(local, cache)  # None for an ordinary directory
    return PackedDataset(local, remote=remote, location=str(location))
