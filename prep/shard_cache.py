"""The node-local shard cache: a packed dataset at a URL (`s3://`, `gs://`, `az://`, `file://`), read through local
copies of its files, so that every loader backend reads a local directory as it does for a dataset on disk.

Its settings (`CacheSettings`: `--shard-cache`, `--shard-cache-limit`, `--storage-options`) are passed in by
whoever opens a dataset (prep/open_dataset.py); nothing here is set process-wide.

Layout, under the cache directory (`--shard-cache`, else `$TWINRAY_SHARD_CACHE`, else the user's cache directory,
e.g. `~/.cache/twinray/shards`):

    <name>-<hash>/                one remote dataset; hash of its URL and storage options (secrets left out)
        manifest.json             the remote's, copied last when it changed: PackedDataset reads this directory
        index.npy, *.idx          fetched when the dataset is opened (small)
        {split}-{NNNNN}.tar       shards, fetched whole when first needed, then kept
        .checked/{shard}.json     per shard in place: the sha256 it was checked against, and its (size, mtime_ns,
                                  inode) then; its own mtime is when the shard was last used
        .remote.json              where the files come from (URL, options less secrets, shard sizes, the limit)
        fetch.log                 one JSON line per download, failed check, re-check or eviction
        .locks/                   one lock file per shard

How a shard arrives (`Remote.ensure`): under a file lock, so that of the processes on a node only one downloads a
given shard and the others wait for it; the whole object is downloaded to a temporary name, its sha256 is checked
against the manifest, and only then is it renamed into place. A copy whose bytes do not match is downloaded once
more; a second mismatch is one line naming the shard.

A cached shard never serves bytes that differ from the manifest's sha256: each time a process opens one, its
(size, mtime_ns, inode) is compared with those recorded when it was checked (`.checked/`). Any write to the file
changes its mtime, and a replaced file has another inode, so a copy changed after its download, at the same size
too, is noticed before it is read: it is hashed again, and if its sha256 no longer matches it is deleted, fetched
again, and named in one line on stderr and in fetch.log. (The download's mtime is set to the fine clock's
nanoseconds, which a later write, stamped by the kernel's coarse clock, does not repeat.) The check costs one stat
per shard and process (microseconds; bench/shard_check.py), where hashing every shard at every open would cost a
full read of the split per process and epoch. A change made while a process has the shard open is not seen by
that process; `python -m prep verify` hashes everything.

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
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from filelock import FileLock

from twinray.cli import InputError
from twinray.prep.format import INDEX, MANIFEST, sha256_file
from twinray.prep.remote import check_container
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
CHECKED = ".checked"
PREFETCH_THREADS = 4
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
_UNITS.update({"GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12})


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
    return platformdirs.user_cache_path("twinray") / "shards"


@dataclass(frozen=True)
class CacheSettings:
    """How a dataset at a URL is read (`resolve`): the cache directory, its size limit (bytes, or a string like
    '200GB') and the fsspec storage options (a dict or its JSON text). None takes the default: the environment
    ($TWINRAY_SHARD_CACHE, $TWINRAY_SHARD_CACHE_LIMIT, $TWINRAY_STORAGE_OPTIONS), else the user's cache directory,
    no limit and no options. Raises InputError for a limit or options that do not parse."""

    directory: Path | None = None
    limit: int | None = None
    storage_options: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "directory", Path(self.directory) if self.directory else None)
        object.__setattr__(self, "limit", parse_size(self.limit))
        if isinstance(self.storage_options, str):
            object.__setattr__(self, "storage_options", parse_storage_options(self.storage_options))

    @classmethod
    def from_args(cls, args) -> CacheSettings:
        """From the namespace add_arguments filled."""
        return cls(args.shard_cache, args.shard_cache_limit, args.storage_options)


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


def resolve(url: str, settings: CacheSettings | None = None) -> Path:
    """Makes the local copy of the dataset at `url` ready to open and returns its directory: the manifest, index and
    DALI indexes are fetched now (the manifest each time, to see a changed dataset), the shards later, as they are
    needed (Remote.ensure). `settings` (CacheSettings) left None, or its fields left None, come from the
    environment. Raises InputError in one line for a missing bucket or dataset, a missing extra, an unreachable
    store, or a damaged index."""
    settings = CacheSettings() if settings is None else settings
    directory = Path(settings.directory or default_directory())
    limit = settings.limit
    if limit is None:
        limit = parse_size(os.environ.get(LIMIT_ENV))
    options = settings.storage_options
    if options is None:
        options = parse_storage_options(None)
    fs, root = filesystem(url, options)
    try:
        manifest_bytes = fs.cat_file(join(root, MANIFEST))
    except FileNotFoundError:
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
                    _record_path(local, name).unlink(missing_ok=True)
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


def _record_path(local: Path, name: str) -> Path:
    return local / CHECKED / f"{name}.json"


def _stat(path: Path) -> list[int]:
    """What any change to a file changes: its size, mtime (ns) and inode. Raises FileNotFoundError."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


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

    def __init__(self, local: Path, marker: dict, storage_options: dict | None = None):
        """`storage_options`: the opener's (CacheSettings), credentials included; None for the environment's."""
        self.root = local
        self.given_options = storage_options
        self.url: str = marker["url"]
        self.sizes: dict[str, int] = marker["sizes"]
        self.cache = Path(marker["cache"])
        self.limit: int | None = marker["limit"]
        self.options = marker["storage_options"]
        self.manifest = json.loads((local / MANIFEST).read_text())
        self._fs = None
        self._fs_lock = threading.Lock()
        self._ready: set[str] = set()  # shards this process has checked are in place
        self._records: dict[str, dict] = {}  # .checked/ records this process has read or written
        self._failed: dict[str, InputError] = {}  # background fetches that failed, raised on use
        self._queued: set[str] = set()
        self._queue: queue.Queue | None = None

    @classmethod
    def attached(cls, local: Path, storage_options: dict | None = None) -> Remote | None:
        """The Remote of a cache directory, or None for an ordinary packed directory (no marker). `storage_options`
        (the opener's) serve a Remote made now; left None, a forked child takes those its parent opened the
        directory with (it inherits the parent's Remote), else the environment's."""
        key = (os.getpid(), local)
        remote = cls._open.get(key)
        if remote is None:
            marker = local / MARKER
            if not marker.is_file():
                return None
            if storage_options is None:  # a forked child: the options of the Remote its parent opened
                inherited = [r.given_options for (pid, root), r in cls._open.items() if root == local]
                storage_options = next((o for o in inherited if o is not None), None)
            remote = cls._open.setdefault(key, Remote(local, json.loads(marker.read_text()), storage_options))
        return remote

    def _filesystem(self):
        # Options less secrets: credentials come from the environment, as they did for resolve().
        with self._fs_lock:
            if self._fs is None:
                options = {**self.options, **(self.given_options or parse_storage_options(None))}
                self._fs = filesystem(self.url, options)
            return self._fs

    def shard_bytes(self, name: str) -> int:
        return self.sizes[name]

    def ensure(self, name: str) -> Path:
        """The local path of shard `name`, its bytes those of the manifest's sha256: downloaded and checked first if
        needed, hashed again if the copy changed on disk since it was checked (see the module docstring). Raises
        InputError naming the shard's URL after a second bad download, or when the cache cannot hold it."""
        path = self.root / name
        if not self._intact(name, path):
            if name in self._failed:
                raise self._failed[name]
            with _lock(self.root / ".locks" / f"{name}.lock"):
                if name in self._failed:  # a background thread of this process failed while this one waited
                    raise self._failed[name]
                # Another process may have fetched it while this one waited; a copy on disk is hashed again.
                if not self._intact(name, path) and not self._recheck(name, path):
                    self._fetch(name, path)
        try:
            os.utime(_record_path(self.root, name))  # least recently used = oldest mtime of the record
        except FileNotFoundError:  # evicted by another process in the meantime: fetch it again
            return self.ensure(name)
        self._ready.add(name)
        return path

    def _intact(self, name: str, path: Path) -> bool:
        """Whether the file's (size, mtime_ns, inode) are those recorded when it was checked against the manifest's
        sha256: one stat, and a read of the record when it is new to this process or the stat differs."""
        try:
            now = _stat(path)
        except FileNotFoundError:
            return False
        record = self._records.get(name)
        if record is None or record["stat"] != now:
            try:  # another process may have fetched or checked it since
                record = json.loads(_record_path(self.root, name).read_bytes())
            except (FileNotFoundError, json.JSONDecodeError):
                return False
            self._records[name] = record
        return record["stat"] == now and record["sha256"] == self.manifest["shards"][name]

    def _seal(self, name: str, path: Path) -> None:
        """Records that `path` holds the manifest's bytes of `name`, with the stat that shows any later change."""
        now = time.time_ns()  # the fine clock: a later write stamps the coarse one, so its mtime differs
        os.utime(path, ns=(now, now))
        record = {"sha256": self.manifest["shards"][name], "stat": _stat(path)}
        (self.root / CHECKED).mkdir(exist_ok=True)
        _write_atomic(_record_path(self.root, name), json.dumps(record).encode())
        self._records[name] = record

    def _recheck(self, name: str, path: Path) -> bool:
        """A copy on disk that changed since it was checked (or has no record): True when its sha256 still matches
        the manifest's, and it is recorded again; otherwise it is deleted, the change named on stderr, and False."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size != self.sizes[name]:
            why = "size differs from the store's"
        elif sha256_file(path) == self.manifest["shards"][name]:
            self._seal(name, path)
            _log(self.root, event="recheck", file=name, ok=True)
            return True
        else:
            why = "changed on disk after its download: sha256 differs from the manifest's"
            sys.stderr.write(f"shard cache: {path}: {why}; fetching it again\n")
        _log(self.root, event="refetch", file=name, why=why)
        path.unlink()
        _record_path(self.root, name).unlink(missing_ok=True)
        return False

    def _fetch(self, name: str, path: Path) -> None:
        size = self.sizes[name]
        reservation = self._make_room(name, size)
        fs, remote_root = self._filesystem()
        digest = self.manifest["shards"][name]
        try:
            _fetch_checked(fs, join(remote_root, name), path, digest, join(self.url, name), self.root, size)
            self._seal(name, path)
        except InputError as e:
            self._failed[name] = e  # not tried again by this process
            raise
        finally:
            if reservation is not None:
                reservation.unlink(missing_ok=True)

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
                try:  # when the shard was last used: its record's mtime (ensure)
                    used = _record_path(path.parent, path.name).stat().st_mtime
                except FileNotFoundError:
                    used = stat.st_mtime
                shards.append((used, stat.st_size, path))
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
                _record_path(path.parent, path.name).unlink(missing_ok=True)
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


def attached(local: Path, settings: CacheSettings | None = None) -> Remote | None:
    """The Remote of a cache directory (see Remote.attached), with `settings`' storage options; None for an
    ordinary packed directory."""
    return Remote.attached(Path(local), settings.storage_options if settings is not None else None)
