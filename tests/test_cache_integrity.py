"""The shard cache never serves bytes that differ from the manifest: a cached shard changed on disk after its
download, at the same size, is noticed before it is read and fetched again (prep/shard_cache.py).

Against the real S3-compatible server the tests start (the `s3` fixture, tests/s3server.py)."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest

from twinray.prep import shard_cache
from twinray.prep.format import PackedDataset
from twinray.prep.open_dataset import open_dataset
from twinray.prep.shard_cache import CacheSettings

SHARD = "val-00000.tar"


@pytest.fixture
def cached(tmp_path, s3, s3_covid):
    """s3_covid's dataset with every shard fetched into a fresh cache: (its PackedDataset, the cached val shard, the
    cache's settings, to open it again with)."""
    settings = CacheSettings(tmp_path / "shard-cache", None, s3.storage_options)
    data = open_dataset(s3_covid, settings)
    data.remote.fetch_all()
    return data, data.root / SHARD, settings


def val_images(data: PackedDataset) -> list[np.ndarray]:
    rows = np.flatnonzero(data.index["split"] == 1)  # not indices(): no background fetches during the test
    return [data.image(int(i)) for i in rows]


def events(data: PackedDataset) -> list[tuple[str, str]]:
    return [(e["event"], e.get("why", "")) for e in shard_cache.read_log(data.root) if e["file"] == SHARD]


def change_pixels(path, how: str) -> None:
    """64 bytes in the middle of the shard's first JPEG changed, at the same size: written in place, or as an
    editor saves (a new file renamed over the old one)."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[0]
    at = member.offset_data + member.size // 2
    data = bytearray(path.read_bytes())
    data[at : at + 64] = bytes(b ^ 0x5A for b in data[at : at + 64])
    if how == "in place":
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(data[at : at + 64])
    else:
        tmp = path.with_name("edited.tmp")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, path)


@pytest.mark.parametrize("how", ["in place", "replaced"])
def test_a_cached_shard_changed_at_the_same_size_is_fetched_again_before_it_is_read(cached, covid_packed, capfd, how):
    data, path, settings = cached
    expected = val_images(PackedDataset(covid_packed))
    size = path.stat().st_size
    change_pixels(path, how)
    assert path.stat().st_size == size and path.read_bytes() != (covid_packed / SHARD).read_bytes()

    # The process that fetched it, asking again, and a process new to it: neither reads the changed bytes.
    assert data.remote.ensure(SHARD) == path
    assert path.read_bytes() == (covid_packed / SHARD).read_bytes()
    change_pixels(path, how)
    fresh = open_dataset(data.location, settings)
    got = val_images(fresh)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert path.read_bytes() == (covid_packed / SHARD).read_bytes()
    changed = ("refetch", "changed on disk after its download: sha256 differs from the manifest's")
    assert events(data) == [("fetch", ""), changed, ("fetch", ""), changed, ("fetch", "")]
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == [f"shard cache: {path}: {changed[1]}; fetching it again"] * 2


def test_a_touched_shard_whose_bytes_still_match_is_hashed_again_and_kept(cached):
    data, path, settings = cached
    before = path.stat().st_ino
    os.utime(path)  # a new mtime, the same bytes (a copy tool, a backup restoring it)
    fresh = open_dataset(data.location, settings)
    assert len(val_images(fresh)) == 6
    assert events(data) == [("fetch", ""), ("recheck", "")]  # hashed again, not downloaded again
    assert path.stat().st_ino == before
    assert fresh.remote.ensure(SHARD) == path and events(data)[-1] == ("recheck", "")  # recorded: once is enough
