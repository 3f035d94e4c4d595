"""`prep ... --out URL`: a dataset packed locally, then uploaded with its manifest last.

The build runs in a temporary directory (under `$TMPDIR`, which must hold the packed dataset once) exactly as a
local `--out` does, so the shards are byte-identical to a local build. The upload sends shards, DALI indexes and
index.npy first and manifest.json last: a reader looks for the manifest, so it sees the whole dataset or none.
Re-running on a URL that already holds a manifest does nothing unless `--force` is given; `--force` deletes the old
manifest before anything else, so that no reader opens the old manifest over new shards.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from twinray.cli import InputError
from twinray.prep import build
from twinray.prep.format import MANIFEST
from twinray.storage import filesystem, join, protocol, remote_errors, upload_dataset

# Stores without buckets or containers: the path is created as needed.
LOCAL_PROTOCOLS = {"file", "local", "memory"}


def check_container(fs, root: str, url: str) -> None:
    """Raises InputError in one line when the bucket (or container) of `url` does not exist."""
    if protocol(url) in LOCAL_PROTOCOLS:
        return
    bucket = root.strip("/").split("/")[0]
    with remote_errors(url):
        if not fs.exists(bucket):
            raise InputError(f"{url}: bucket {bucket!r} does not exist (or these credentials cannot see it)")


def check_writable_location(url: str, storage_options: dict | None = None):
    """(fs, root) for `url`, after checking that its bucket or container exists (one InputError line if not)."""
    fs, root = filesystem(url, storage_options)
    check_container(fs, root, url)
    if protocol(url) in LOCAL_PROTOCOLS:
        with remote_errors(url):
            fs.makedirs(root, exist_ok=True)
    return fs, root


def pack_to_url(plan: build.Plan, url: str, storage_options: dict | None = None, force: bool = False, **pack_args):
    """Packs `plan` (build.pack's keyword arguments in `pack_args`) and uploads it to `url`; returns build.Result
    with `out` the URL. Raises InputError in one line for a missing bucket or a store that refuses the upload."""
    fs, root = check_writable_location(url, storage_options)
    manifest_url = join(root, MANIFEST)
    with remote_errors(url):
        existing = fs.exists(manifest_url)
        if existing and not force:
            return build.Result(url, json.loads(fs.cat_file(manifest_url)), False, plan.count_reasons)
    with tempfile.TemporaryDirectory(prefix="twinray-prep-") as tmp:
        name = url.rstrip("/").rsplit("/", 1)[-1] or "dataset"
        result = build.pack(plan, Path(tmp) / name, force=True, **pack_args)
        if existing:
            with remote_errors(url):
                fs.rm_file(manifest_url)  # first: no reader may pair the old manifest with new shards
        upload_dataset(result.out, url, storage_options)
    return build.Result(url, result.manifest, written=True, count_reasons=plan.count_reasons)
