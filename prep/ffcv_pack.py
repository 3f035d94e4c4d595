"""Packing a split for the FFCV backend: one `.beton` file, written once, read by pipelines/ffcv_backend.py.

FFCV's RGBImageField insists on 3 channels, so each grey image is stored raw: an `NDArrayField` uint8 zero-padded
to the split's largest height and width, next to its true size, its label and its index.npy row. Decoding is then a
memcpy. `bench/ffcv_fields.py` measures the choice against RGBImageField (JPEG or raw, grey repeated): raw grey reads
8x faster than JPEG on the CPU and is lossless, at 3.3x JPEG's disk; raw RGB needs 3x the disk of raw grey. Beton
position k is `data.indices(split)[k]`. ffcv is imported only when a beton is written or read (`require_ffcv`): it is
an optional extra, absent from some machines.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from twinray.prep.open_dataset import open_dataset

MISSING = (
    "backend 'ffcv' needs the ffcv extra: pip install 'twinray[ffcv]' "
    "(and apt packages pkg-config libturbojpeg0-dev libopencv-dev)"
)


@contextlib.contextmanager
def torch_threads_kept():
    """FFCV sets torch's thread count process-wide: to 1 when imported, to num_workers for each Loader and epoch.
    Augment runs on torch, so put the caller's count back."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def require_ffcv():
    """Imports ffcv (keeping torch's thread count); ValueError naming the extra to install when it is missing."""
    try:
        with torch_threads_kept():
            import ffcv  # noqa: F401
    except ImportError:
        raise ValueError(MISSING) from None
    _drop_numba_finalizer_keyerrors()


def _is_numba_finalizer_keyerror(unraisable) -> bool:
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code if tb is not None else None
    return (
        unraisable.exc_type is KeyError
        and code is not None
        and code.co_name == "finalizer"
        and code.co_filename.endswith(os.path.join("numba", "core", "dispatcher.py"))
    )


def _drop_numba_finalizer_keyerrors():
    """Keeps one known, harmless ffcv 1.0.2 error out of sys.unraisablehook; every other one passes on.

    ffcv's OS cache sets `.mutable = False` on numba's shared `uint8[::1]` type after numba has hashed it into a
    compiled function's table. When a discarded Loader's functions are collected, numba's finalizer then misses that
    key and raises KeyError (it only skips unregistering them). Python would print a traceback for each. Worse,
    pytest formats it with `ast`, and if the collection happened inside another `ast` call, CPython 3.11.7 fails
    that call with "AST constructor recursion depth mismatch" (gh-106905): it once failed CI in DALI's import."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_numba_finalizer_keyerrors", False):
        return

    def hook(unraisable):
        if not _is_numba_finalizer_keyerror(unraisable):
            previous(unraisable)

    hook.drops_numba_finalizer_keyerrors = True
    sys.unraisablehook = hook


def beton_path(data_dir, split: str) -> Path:
    return Path(data_dir) / "ffcv" / f"{split}.beton"


class _Samples(Dataset):
    """One split as FFCV's writer wants it: (image padded to H x W, (height, width), label, row) per position.

    Holds only the path (it may be pickled into the writer's processes). A sample that fails to decode is written
    as zeros and its row recorded in `failed`: FFCV's writer waits forever for a worker that died."""

    def __init__(self, root: Path, rows: np.ndarray, height: int, width: int, failed):
        self.root, self.rows, self.height, self.width, self.failed = root, rows, height, width, failed
        self.data = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        if self.data is None:
            self.data = open_dataset(self.root)
        i = int(self.rows[k])
        try:
            image = self.data.image(i)
        except Exception:  # recorded, not raised (see above)
            self.failed.value = i
            image = np.zeros((0, 0), np.uint8)
        padded = np.zeros((self.height, self.width), np.uint8)
        padded[: image.shape[0], : image.shape[1]] = image
        label = self.data.labels(np.array([i]))[0]
        label = label.astype(np.int8) if self.data.task == "multilabel" else int(label)
        return padded, np.array(image.shape, np.int32), label, i


def write_beton(data_dir, split: str, out_path=None) -> Path:
    """Writes one split of a packed dataset to `<data_dir>/ffcv/<split>.beton` (or `out_path`); returns the path.
    The file appears whole or not at all: it is written under a temporary name, then renamed."""
    require_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    data = open_dataset(data_dir)
    rows = data.indices(split)
    if len(rows) == 0:
        raise ValueError(f"{data.root}: split {split!r} is empty")
    height, width = (int(data.index[f][rows].max()) for f in ("height", "width"))
    label = NDArrayField(np.dtype("int8"), (len(data.classes),)) if data.task == "multilabel" else IntField()
    fields = {
        "image": NDArrayField(np.dtype("uint8"), (height, width)),
        "size": NDArrayField(np.dtype("int32"), (2,)),
        "label": label,
        "row": IntField(),
    }
    out = Path(out_path) if out_path is not None else beton_path(data.root, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # per process: ranks racing each write their own
    # A sample must fit in one page; FFCV's default (8 MiB) wastes up to a page per writer.
    page = max(MIN_PAGE_SIZE, 1 << math.ceil(math.log2(height * width + 4096)))
    failed = multiprocessing.Value("q", -1)
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=page, num_workers=1)  # one worker keeps it simple
        writer.from_indexed_dataset(_Samples(data.root, rows, height, width, failed))
        if failed.value >= 0:
            data.image(failed.value)  # the writer's process only passes the row on: this names shard and fault
            raise ValueError(f"{data.root}: row {failed.value} failed to load (`python -m prep verify DIR`)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
