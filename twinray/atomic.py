"""Atomic writes: a reader never sees half a file, and a failed write leaves the old one. Used by every package."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic(path: str | Path):
    """Yields a temporary path beside `path` to write; it replaces `path` only once the block succeeds, so a reader
    never sees half a file and a failed write leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj) -> Path:
    """Indented JSON, written atomically."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return Path(path)
