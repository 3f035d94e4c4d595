"""Object-store locations: telling a URL from a local path, opening its fsspec filesystem, and turning what the
store raises into one line.

A location is a URL when it starts with `scheme://` (`s3://bucket/packed/covid`, `gs://...`, `az://...`,
`file:///data/packed/covid`); anything else is a local path. A URL is never handed to `pathlib.Path`, which would
fold `s3://bucket` into the relative path `s3:/bucket`.

Endpoints and other settings come from `--storage-options` (a JSON object passed to the fsspec filesystem, e.g.
`{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}`) or from fsspec's own configuration
(`FSSPEC_S3_...` variables, `~/.config/fsspec/`). Credentials come from the store's usual environment variables or
profile files (`AWS_ACCESS_KEY_ID`, `~/.aws/credentials`, ...): twinray never prints them, and a value under a key
that names a secret is left out of anything twinray writes to disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from twinray.cli import InputError

# `scheme://`, scheme of two or more characters (a Windows drive letter `C:` is one, and has no `//`)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# protocol -> (pyproject extra, the package it brings)
EXTRAS = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
    "abfss": ("azure", "adlfs"),
    "adl": ("azure", "adlfs"),
}
# Keys whose values are never written to disk (the shard cache records the options it was opened with).
_SECRET = re.compile(r"key|secret|token|password|credential|sas|signature", re.IGNORECASE)
STORAGE_OPTIONS_ENV = "TWINRAY_STORAGE_OPTIONS"


def is_url(location) -> bool:
    """True for `scheme://...` strings; a Path is always local."""
    return isinstance(location, str) and _URL.match(location) is not None


def protocol(url: str) -> str:
    return _URL.match(url).group(1).lower()


def location(text: str) -> str | Path:
    """argparse type for a dataset location: a URL stays a string, anything else becomes a Path."""
    return text if is_url(text) else Path(text)


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def parse_storage_options(text: str | None) -> dict:
    """`--storage-options` JSON -> dict; None or empty gives `TWINRAY_STORAGE_OPTIONS` from the environment, or {}.
    Raises InputError naming the value when it is not a JSON object."""
    if not text:
        text = os.environ.get(STORAGE_OPTIONS_ENV, "")
        if not text:
            return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--storage-options is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError("--storage-options must be a JSON object, such as '{\"client_kwargs\": {...}}'")
    return value


def storage_options_type(text: str) -> dict:
    """argparse type for `--storage-options`."""
    try:
        return parse_storage_options(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def without_secrets(options: dict) -> dict:
    """`options` less every value under a key that names a secret (at any depth): what may be written to disk."""
    return {
        k: without_secrets(v) if isinstance(v, dict) else v for k, v in options.items() if not _SECRET.search(str(k))
    }


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path within it) for `url`. Raises InputError in one line when the protocol is unknown
    or its package is missing (naming the extra to install, e.g. `pip install 'twinray[s3]'`)."""
    try:
        import fsspec
    except ImportError:
        raise InputError(f"{url}: reading a URL needs fsspec: pip install fsspec") from None
    name = protocol(url)
    try:
        fsspec.get_filesystem_class(name)
    except ImportError as e:
        extra, package = EXTRAS.get(name, (None, None))
        if extra is None:
            raise InputError(f"{url}: the {name}:// store needs a package fsspec names: {_first_line(e)}") from None
        raise InputError(f"{url}: {name}:// needs {package}: pip install 'twinray[{extra}]'") from None
    except ValueError:
        raise InputError(f"{url}: fsspec knows no {name}:// store") from None
    with remote_errors(url):
        return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


@contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Turns what a store raises (a missing bucket, a refused connection, denied access, botocore's and aiohttp's
    own errors) into one InputError line naming `url`."""
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"{url}: not found in the store ({_first_line(e)})") from None
    except PermissionError as e:
        raise InputError(f"{url}: access denied ({_first_line(e)}); credentials come from the environment") from None
    except Exception as e:  # noqa: BLE001 - every store library has its own error types; each becomes one line
        raise InputError(f"{url}: {type(e).__name__}: {_first_line(e)}") from None


def upload_dataset(local_dir: Path, url: str, storage_options: dict | None = None, last: str = "manifest.json"):
    """Copies a finished packed directory to `url`: every file but `last` first, then `last`, so that a reader
    (which looks for the manifest) never sees a half-uploaded dataset. Returns the number of bytes sent."""
    fs, root = filesystem(url, storage_options)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: `last` goes to the end
    sent = 0
    local_store = protocol(url) in ("file", "local")  # needs its folders made; a bucket has none
    with remote_errors(url):
        for path in files:
            target = join(root, path.relative_to(local_dir).as_posix())
            if local_store:
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(path), target)
            sent += path.stat().st_size
    return sent


def local_path(text: str) -> Path:
    """argparse type for an argument that must be local (a source folder, say): a URL is refused in one line
    rather than taken for a relative path."""
    if is_url(text):
        raise argparse.ArgumentTypeError(f"{text}: a URL; this takes a local path (copy the data here first)")
    return Path(text)
