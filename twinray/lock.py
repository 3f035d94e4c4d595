"""One writer per output: `prep`, `pretrain` and `finetune` hold an exclusive lock on their `--out` while they write.

The lock is a file beside the output (`.NAME.lock` in its parent folder), so it exists before the output does and
is never part of a published dataset or run. It is taken without waiting: a second writer is refused at once, in
one line, before it changes anything. The operating system releases the lock when its process ends, a killed one
included (filelock's fcntl lock), so a stale lock file never blocks a later run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from twinray.cli import InputError


def lock_path(out: str | Path) -> Path:
    """The lock file of output `out`: `.NAME.lock` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


@contextmanager
def exclusive(out: str | Path, what: str) -> Iterator[Path]:
    """Holds the lock of `out` for the block. `what` names the writer in the error ("prep", "pretraining").

    Raises InputError naming `out` when another process holds it."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(
            f"{out}: another {what} is writing to it now (lock {path}); wait for it to finish or use another --out"
        ) from None
    try:
        yield path
    finally:
        lock.release()
