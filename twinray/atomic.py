"""Atomic writes: a reader never sees half a file, and a failed write leaves the old one. Used by every package."""

from __future__ import annotations

import csv
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from twinray.cli import DISK_FULL, disk_full


@contextmanager
def atomic(path: str | Path):
    """Yields a temporary path beside `path` to write; it replaces `path` only once the block succeeds, so a reader
    never sees half a file and a failed write leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with naming(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def naming(path: str | Path):
    """Names `path` in a full-disk error (ENOSPC, EDQUOT) raised in the block, which twinray.cli.run_cli turns into
    one line naming the path: an OSError that names no file (those of write() and close() do not) gets `path`, and a
    library's own error that carries the OS error only in its text (safetensors: "... (os error 28)") becomes that
    OSError. Other errors pass as they are."""
    try:
        yield
    except OSError as e:
        if disk_full(e) and e.filename is None:
            e.filename = str(path)
        raise
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code and int(code.group(1)) in DISK_FULL:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
        raise


def write_json(path: str | Path, obj) -> Path:
    """Indented JSON, written atomically."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return Path(path)


def write_csv(path: str | Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    """A CSV with a header, written atomically. `fields`: the columns in order; by default every key of `rows` in
    the order first seen (a key missing from a row is an empty cell)."""
    fields = fields or list(dict.fromkeys(k for row in rows for k in row))
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
