"""The node-local shard cache: a packed dataset at a URL (`s3://`, `gs://`, `az://`, `file://`), read through local
copies of its files, so that every loader backend reads a local directory as it does for a dataset on disk.

Layout, under the cache directory (`--shard-cache`, else `$TWINRAY_SHARD_CACHE`, else the user's cache directory,
e.g. `~/.cache/twinray/shards`):

    <name>-<hash>/                one remote dataset; hash of its URL and storage options (secrets left out)
        manifest.json             the remote's, copied last when it changed: PackedDataset reads this directory
        index.npy, *.idx          fetched when the dataset is opened (small)
        {split}-{NNNNN}.tar       shards, fetched whole when first needed, then kept
        .remote.json              where the files come from (URL, options less secrets, shard sizes, the limit)
        fetch.log                 one JSON line per download, failed check or eviction
        .locks/                   one lock file per shard

How a shard arrives (`Remote.ensure`): under a file lock, so that of the processes on a node only one downloads a
given shard and the others wait for it; the whole object is downloaded to a temporary name, its sha256 is checked
against the manifest, and only then is it renamed into place. A copy whose bytes do not match is downloaded once
more; a second mismatch is one line naming the shard. A cached copy whose size differs from the store's (cut short
on disk) is deleted and fetched again.

When: opening a split (`PackedDataset.indices(split)`, which every loader calls) queues its shards for background
threads that download them in manifest order, several at a time. A read that needs a shard not there yet fetches it
at once (or waits for the thread already fetching it). So training starts as soon as the shards its first batch
touches are local, while the rest download. A split is shuffled as a whole each epoch, so the first batches touch
most shards of a small split; on a large one the first step waits for about as many shards as the batch holds.

Size limit (`--shard-cache-limit`, e.g. `200GB`; none by default): before a download, the least recently used whole
shards of the cache (any dataset's) are deleted until the new one fits, never those of a split this process has
opened. A split larger than the limit is refused when it is opened, in one line: every epoch reads all of it in a
new order, so a cache smaller than the split would fetch every shard again every epoch. A shard deleted while
another process has it open stays readable to that process; one it has not opened yet is fetched again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import re
import threading
import time
from pathlib import Path

from twinray.cli import InputError
from twinray.prep.format import INDEX, MANIFEST, sha256_file
from twinray.storage import (
    filesystem,
    join,
    parse_storage_options,
    remote_errors,
    storage_options_type,
    without_secrets,
)

CACHE_ENV = "TWINRAY_SHARD_CACHE"
LIMIT_ENV = "TWINRAY_SHARD_CACHE_LIMIT"
MARKER = ".remote.json"
LOG = "fetch.log"
PREFETCH_THREADS = 4
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
_UNITS.update({"GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12})

# What the CLIs set from --shard-cache, --shard-cache-limit and --storage-options (configure).
_settings: dict = {"directory": None, "limit": None, "storage_options": None}


def parse_size(text: str | int | None) -> int | None:
    """'200GB', '1.5TiB', '512MB', '1000' (bytes) -> bytes; None or '' -> None (no limit). Raises InputError."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise InputError(f"shard cache limit {text!r} is not a size such as 200GB, 1.5TiB or 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def default_directory() -> Path:
    """$TWINRAY_SHARD_CACHE, else `shards` in the user's cache directory (platformdirs: ~/.cache/twinray on Linux)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import platformdirs

    return platformdirs.user_cache_path("twinray") / "shards"


def configure(directory=None, limit=None, storage_options=None) -> None:
    """Sets what `resolve` uses when PackedDataset is handed a URL: the cache directory, its size limit (bytes or a
    string like '200GB') and the fsspec storage options (a dict or its JSON text). None keeps the default."""
    _settings["directory"] = Path(directory) if directory else None
    _settings["limit"] = parse_size(limit)
    _settings["storage_options"] = (
        parse_storage_options(storage_options) if isinstance(storage_options, (str, type(None))) else storage_options
    )


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser) -> None:
    """`--shard-cache`, `--shard-cache-limit` and `--storage-options` for a CLI that reads a dataset; a bad value is
    the parser's one-line error."""
    parser.add_argument(
        "--shard-cache", default=None, help=f"node-local cache for URL datasets (${CACHE_ENV}, ~/.cache/twinray/shards)"
    )
    parser.add_argument(
        "--shard-cache-limit",
        type=_size_argument,
        default=None,
        help=f"cache size limit, e.g. 200GB (${LIMIT_ENV}; none)",
    )
    parser.add_argument(
        "--storage-options",
        type=storage_options_type,
        default=None,
        help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": URL}}\'; credentials: environment',
    )


def configure_from(args) -> None:
    """configure() from the namespace add_arguments filled."""
    configure(args.shard_cache, args.shard_cache_limit, args.storage_options)


def _log(root: Path, **event) -> None:
    """One JSON line per event; a single short O_APPEND write, so lines from several processes do not mix."""
    line = json.dumps({"time": round(time.time(), 3), "pid": os.getpid(), **event}) + "\n"
    fd = os.open(root / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_log(root: Path) -> list[dict]:
    """The events `_log` wrote for one cached dataset (tests count downloads with it)."""
    path = Path(root) / LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _lock(path: Path):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dataset_directory(url: str, storage_options: dict, directory: Path) -> Path:
    """Where one remote dataset's copy lives: its last path component and a hash of URL and options."""
    key = json.dumps([url.rstrip("/"), without_secrets(storage_options)], sort_keys=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1]) or "dataset"
    return directory / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def resolve(url: str, directory=None, limit=None, storage_options=None) -> Path:
    """Makes the local copy of the dataset at `url` ready to open and returns its directory: the manifest, index and
    DALI indexes are fetched now (the manifest each time, to see a changed dataset), the shards later, as they are
    needed (Remote.ensure). Arguments left None come from configure(), then the environment. Raises InputError in
    one line for a missing bucket or dataset, a missing extra, an unreachable store, or a damaged index."""
    directory = Path(directory or _settings["directory"] or default_directory())
    limit = parse_size(limit) if limit is not None else _settings["limit"]
    if limit is None:
        limit = parse_size(os.environ.get(LIMIT_ENV))
    options = storage_options if storage_options is not None else _settings["storage_options"]
    if options is None:
        options = parse_storage_options(None)
    fs, root = filesystem(url, options)
    try:
        manifest_bytes = fs.cat_file(join(root, MANIFEST))
    except FileNotFoundError:
        from twinray.prep.remote import check_container

        check_container(fs, root, url)  # a missing bucket says so
        raise InputError(f"{url}: no {MANIFEST} there: not a packed dataset, or its upload has not finished") from None
    except Exception as e:  # noqa: BLE001 - each store's own errors, made one line
        with remote_errors(url):
            raise e
    try:
        manifest = json.loads(manifest_bytes)
        shards = dict(manifest["shards"])
        index_sha = manifest["index"]["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{join(url, MANIFEST)}: not a packed dataset's manifest ({e})") from None
    with remote_errors(url):
        listing = {Path(entry["name"]).name: int(entry["size"]) for entry in fs.ls(root, detail=True)}
    missing = [name for name in shards if name not in listing]
    if missing:
        raise InputError(f"{join(url, missing[0])}: listed in the manifest but missing from the store")

    local = dataset_directory(url, options, directory)
    local.mkdir(parents=True, exist_ok=True)
    with _lock(local / ".locks" / "dataset.lock"):
        _clean_stale(local)
        old_path = local / MANIFEST
        old = json.loads(old_path.read_bytes()) if old_path.is_file() else None
        if old is not None and old_path.read_bytes() != manifest_bytes:
            # Another version of the dataset: keep only shards whose sha256 is unchanged.
            for name, digest in old.get("shards", {}).items():
                if shards.get(name) != digest:
                    (local / name).unlink(missing_ok=True)
            for idx in local.glob("*.idx"):
                idx.unlink()
            old_path.unlink()  # the directory is incomplete until the new manifest is in place
        if not (local / INDEX).is_file() or sha256_file(local / INDEX) != index_sha:
            _fetch_checked(fs, join(root, INDEX), local / INDEX, index_sha, join(url, INDEX), local)
        idx_names = [Path(name).with_suffix(".idx").name for name in shards]
        wanted = [name for name in idx_names if name in listing and not (local / name).is_file()]
        if wanted:
            with remote_errors(url):
                fetched = fs.cat([join(root, name) for name in wanted])
            for path, data in fetched.items():
                _write_atomic(local / Path(path).name, data)
        marker = {
            "url": url,
            "storage_options": without_secrets(options),
            "sizes": {name: listing[name] for name in shards},
            "cache": str(directory),
            "limit": limit,
        }
        _write_atomic(local / MARKER, json.dumps(marker, indent=2).encode())
        if not old_path.is_file():
            _write_atomic(old_path, manifest_bytes)  # last: with it, the directory opens as a packed dataset
    Remote._open.pop((os.getpid(), local), None)  # a Remote opened before holds the old manifest
    return local


def _clean_stale(local: Path) -> None:
    """Deletes temporary files of downloads whose process is gone (killed mid-download)."""
    for part in local.glob(".*.part"):
        match = re.search(r"\.(\d+)-\d+\.part$", part.name)
        if match and not _pid_alive(int(match.group(1))):
            part.unlink(missing_ok=True)
    for reservation in local.glob(".locks/*.reserve"):  # space reserved by a download that never finished
        pid = reservation.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            reservation.unlink(missing_ok=True)


def _fetch_checked(fs, remote: str, path: Path, sha256: str, url: str, local: Path, size: int | None = None) -> None:
    """Downloads `remote` whole to a temporary name, checks its size and sha256, then renames it to `path`. A copy
    that does not match is fetched once more; a second mismatch raises InputError naming `url`."""
    for attempt in (1, 2):
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
        try:
            start = time.perf_counter()
            with remote_errors(url):
                fs.get_file(remote, str(tmp))
            got = tmp.stat().st_size
            ok = (size is None or got == size) and sha256_file(tmp) == sha256
            seconds = round(time.perf_counter() - start, 3)
            _log(local, event="fetch", file=path.name, bytes=got, seconds=seconds, ok=ok, attempt=attempt)
            if ok:
                os.replace(tmp, path)
                return
        finally:
            tmp.unlink(missing_ok=True)
    raise InputError(
        f"{url}: sha256 does not match the manifest in 2 downloads; the stored copy is damaged or was replaced "
        "(pack it again, or check it with `python -m prep verify URL`)"
    )


class Remote:
    """The shards of one cached dataset: fetched on demand (`ensure`) or in the background (`want`)."""

    _open: dict[tuple[int, Path], Remote] = {}  # (pid, local dir) -> Remote; a forked child makes its own
    _pinned: set[Path] = set()  # shards of the splits this process opened, of any dataset: never evicted by it

    def __init__(self, local: Path, marker: dict):
        self.root = local
        self.url: str = marker["url"]
        self.sizes: dict[str, int] = marker["sizes"]
        self.cache = Path(marker["cache"])
        self.limit: int | None = marker["limit"]
        self.options = marker["storage_options"]
        self.manifest = json.loads((local / MANIFEST).read_text())
        self._fs = None
        self._fs_lock = threading.Lock()
        self._ready: set[str] = set()  # shards this process has checked are in place
        self._failed: dict[str, InputError] = {}  # background fetches that failed, raised on use
        self._queued: set[str] = set()
        self._queue: queue.Queue | None = None

    @classmethod
    def attached(cls, local: Path) -> Remote | None:
        """The Remote of a cache directory, or None for an ordinary packed directory (no marker)."""
        key = (os.getpid(), local)
        remote = cls._open.get(key)
        if remote is None:
            marker = local / MARKER
            if not marker.is_file():
                return None
            remote = cls._open.setdefault(key, Remote(local, json.loads(marker.read_text())))
        return remote

    def _filesystem(self):
        # Options less secrets: credentials come from the environment, as they did for resolve().
        with self._fs_lock:
            if self._fs is None:
                options = {**self.options, **(_settings["storage_options"] or parse_storage_options(None))}
                self._fs = filesystem(self.url, options)
            return self._fs

    def shard_bytes(self, name: str) -> int:
        return self.sizes[name]

    def ensure(self, name: str) -> Path:
        """The local path of shard `name`, downloaded and checked first if needed (see the module docstring).
        Raises InputError naming the shard's URL after a second bad download, or when the cache cannot hold it."""
        path = self.root / name
        if name in self._ready and path.exists():  # exists: another process may have evicted it since
            return path
        if name in self._failed:
            raise self._failed[name]
        size = self.sizes[name]
        if not self._in_place(path, size):
            with _lock(self.root / ".locks" / f"{name}.lock"):
                if name in self._failed:  # a background thread of this process failed while this one waited
                    raise self._failed[name]
                if not self._in_place(path, size):  # another process may have fetched it while this one waited
                    if path.exists():
                        _log(self.root, event="refetch", file=name, why="size differs from the store's")
                        path.unlink()
                    reservation = self._make_room(name, size)
                    fs, remote_root = self._filesystem()
                    digest = self.manifest["shards"][name]
                    try:
                        _fetch_checked(fs, join(remote_root, name), path, digest, join(self.url, name), self.root, size)
                    except InputError as e:
                        self._failed[name] = e  # not tried again by this process
                        raise
                    finally:
                        if reservation is not None:
                            reservation.unlink(missing_ok=True)
        try:
            os.utime(path)  # least recently used = oldest mtime
        except FileNotFoundError:  # evicted by another process in the meantime: fetch it again
            return self.ensure(name)
        self._ready.add(name)
        return path

    @staticmethod
    def _in_place(path: Path, size: int) -> bool:
        try:
            return path.stat().st_size == size
        except FileNotFoundError:
            return False

    def want(self, split: str) -> None:
        """This process will read `split`: refuse it if it cannot fit the cache, keep its shards from eviction, and
        queue the missing ones for the background threads."""
        names = [name for name in self.sizes if name.startswith(f"{split}-")]
        total = sum(self.sizes[name] for name in names)
        if self.limit is not None and total > self.limit:
            raise InputError(
                f"{self.url}: split {split!r} is {total / 1e9:.2f} GB, more than the shard cache limit of "
                f"{self.limit / 1e9:.2f} GB: raise --shard-cache-limit or point --shard-cache at a larger disk "
                "(each epoch reads the whole split, so a smaller cache would fetch it again every epoch)"
            )
        Remote._pinned.update(self.root / name for name in names)
        todo = [name for name in names if name not in self._queued and name not in self._ready]
        if not todo:
            return
        if self._queue is None:
            self._queue = queue.Queue()
            for k in range(PREFETCH_THREADS):
                # daemon: a run that ends does not wait for downloads it no longer needs
                threading.Thread(target=self._prefetch, name=f"shard-prefetch-{k}", daemon=True).start()
        for name in todo:
            self._queued.add(name)
            self._queue.put(name)

    def fetch_all(self) -> None:
        """Every shard, now (prep verify)."""
        for name in self.sizes:
            self.ensure(name)

    def _prefetch(self) -> None:
        while True:
            name = self._queue.get()
            try:
                self.ensure(name)
            except InputError:
                pass  # kept in self._failed by ensure, raised when a reader needs the shard
            except Exception as e:  # noqa: BLE001 - kept for the reader, which raises it in one line
                self._failed[name] = InputError(f"{join(self.url, name)}: download failed ({type(e).__name__}: {e})")

    def _make_room(self, name: str, size: int) -> Path | None:
        """Deletes least recently used shards of the whole cache until `size` more bytes fit under the limit, and
        reserves them for `name` while it downloads (the returned file, deleted by the caller afterwards): several
        downloads in flight at once, in this process or another, each count before their shard is in place."""
        if self.limit is None:
            return None
        with _lock(self.cache / ".evict.lock"):
            shards, total = [], 0
            for path in self.cache.glob("*/*.tar"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                shards.append((stat.st_mtime, stat.st_size, path))
                total += stat.st_size
            for reservation in self.cache.glob("*/.locks/*.reserve"):
                pid = int(reservation.name.rsplit(".", 2)[-2])
                try:
                    total += int(reservation.read_text()) if _pid_alive(pid) else 0
                except (FileNotFoundError, ValueError):
                    continue
            for _, shard_size, path in sorted(shards, key=lambda s: s[0]):
                if total + size <= self.limit:
                    break
                if path in Remote._pinned:
                    continue
                path.unlink(missing_ok=True)
                total -= shard_size
                _log(path.parent, event="evict", file=path.name, bytes=shard_size)
            if total + size > self.limit:
                raise InputError(
                    f"{self.cache}: the shard cache limit of {self.limit / 1e9:.2f} GB cannot hold the shards in use "
                    f"({total / 1e9:.2f} GB) and {join(self.url, name)} ({size / 1e9:.3f} GB): "
                    "raise --shard-cache-limit"
                )
            reservation = self.root / ".locks" / f"{name}.{os.getpid()}.reserve"
            reservation.write_text(str(size))
            return reservation


def attached(local: Path) -> Remote | None:
    return Remote.attached(Path(local))
