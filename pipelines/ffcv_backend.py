"""The FFCV backend: a split converted once to a .beton file, read by `ffcv.loader.Loader`, augmented by twinray.

FFCV's RGBImageField insists on 3 channels, so each grey image is stored raw: an `NDArrayField` uint8 zero-padded
to the split's largest height and width, next to its true size, its label and its index.npy row. Decoding is then a
memcpy, and twinray's `Augment` does the rest, as in the native backend. `bench/ffcv_fields.py` measures the choice
against RGBImageField (JPEG or raw, grey repeated): raw grey reads 8x faster than JPEG on the CPU and is lossless, at
3.3x JPEG's disk; raw RGB needs 3x the disk of raw grey. Beton position k is
`data.indices(split)[k]`, so the order of rows (and of the views) is the native backend's.

Each epoch sets the `Loader`'s order to this rank's positions (`rank_order`, as the native backend shuffles), which
OrderOption.SEQUENTIAL follows as given: FFCV's own shuffling and distributed sampler play no part, and resuming is
a matter of skipping rows.
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
from twinray.pipelines.augment import Augment
from twinray.pipelines.loader import Batch, LoaderBase, batch_seed, rank_order
from twinray.prep.format import PackedDataset

MISSING = (
    "backend 'ffcv' needs the ffcv extra: pip install 'twinray[ffcv]' "
    "(and apt packages pkg-config libturbojpeg0-dev libopencv-dev)"
)


@contextlib.contextmanager
def _torch_threads_kept():
    """FFCV sets torch's thread count process-wide: to 1 when imported, to num_workers for each Loader and epoch.
    Augment runs on torch, so put the caller's count back."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ffcv():
    try:
        with _torch_threads_kept():
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
            self.data = PackedDataset(self.root)
        i = int(self.rows[k])
        try:
            image = self.data.image(i)
        except Exception:  # recorded, not raised (see above)
            self.failed.value = i
            image = np.zeros((0, 0), np.uint8)
        padded = np.zeros((self.height, self.width), np.uint8)
        padded[: image.shape[0], : image.shape[1]] = image
        label = self.data.labels(np.array([i]))[0]
        label = int(label) if self.data.task == "multiclass" else label.astype(np.int8)
        return padded, np.array(image.shape, np.int32), label, i


def write_beton(data_dir, split: str, out_path=None) -> Path:
    """Writes one split of a packed dataset to `<data_dir>/ffcv/<split>.beton` (or `out_path`); returns the path.
    The file appears whole or not at all: it is written under a temporary name, then renamed."""
    _ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    data = PackedDataset(data_dir)
    rows = data.indices(split)
    if len(rows) == 0:
        raise ValueError(f"{data.root}: split {split!r} is empty")
    height, width = (int(data.index[f][rows].max()) for f in ("height", "width"))
    label = IntField() if data.task == "multiclass" else NDArrayField(np.dtype("int8"), (len(data.classes),))
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


class FFCVLoader(LoaderBase):
    """The loader contract (see pipelines.loader) over a .beton; same arguments as NativeLoader, plus `beton`
    (default `<data>/ffcv/<split>.beton`, written if missing or older than the dataset's manifest)."""

    def __init__(self, data, workers: int | None = None, prefetch: int = 3, beton=None, **contract):
        """`contract`: build_loader's keywords (split, batch_size, device, recipe, size, views, seed, rank,
        world_size, drop_last); `workers` FFCV threads, `prefetch` batches ahead, `beton` the file (default
        `<data>/ffcv/<split>.beton`)."""
        _ffcv()
        import numba

        super().__init__(data, **contract)
        self.beton = Path(beton) if beton is not None else beton_path(self.data.root, self.split)
        manifest = self.data.root / "manifest.json"
        if not self.beton.is_file() or self.beton.stat().st_mtime < manifest.stat().st_mtime:
            write_beton(self.data.root, self.split, self.beton)
        self.augment = Augment(self.recipe, device=self.device, seed=self.seed)
        # FFCV hands num_workers to numba.set_num_threads, which refuses more than numba's pool (the CPU count).
        self.workers = min(workers or len(os.sched_getaffinity(0)), numba.config.NUMBA_NUM_THREADS)
        self.prefetch = prefetch
        self._loader = None

    def _ffcv_loader(self, positions: np.ndarray):
        """The FFCV Loader, set to yield `positions` of the beton in order.

        Built once: a new Loader recompiles its numba pipeline on first use (~0.5 s), where reusing one costs
        ~1 ms. Built over every position with drop_last=False, it cuts each epoch's order to at most all of them,
        so swapping in a shorter order (what OrderOption.SEQUENTIAL returns, in ffcv 1.0.2) is all it takes."""
        if self._loader is None:
            from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.transforms import ToDevice, ToTensor

            # On CUDA, FFCV copies on its own streams and syncs them with the consumer's; the CPU needs no op.
            to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
            label_decoder = IntDecoder() if self.data.task == "multiclass" else NDArrayDecoder()
            with _torch_threads_kept():
                self._loader = Loader(
                    str(self.beton),
                    batch_size=self.batch_size,
                    num_workers=self.workers,
                    os_cache=True,  # mmap the file: the page cache is shared by the ranks on one machine
                    order=OrderOption.SEQUENTIAL,
                    indices=np.arange(len(self.split_rows)),
                    pipelines={
                        "image": [NDArrayDecoder(), ToTensor(), *to_device],
                        "size": [NDArrayDecoder(), ToTensor()],
                        "label": [label_decoder, ToTensor(), *to_device],
                        "row": [IntDecoder(), ToTensor()],
                    },
                    drop_last=False,  # `positions` hold whole batches only, when drop_last is set
                    batches_ahead=self.prefetch,
                )
            if self._loader.reader.num_samples != len(self.split_rows):  # numba reads out of bounds unchecked
                raise ValueError(
                    f"{self.beton}: {self._loader.reader.num_samples} samples, the split holds "
                    f"{len(self.split_rows)}; delete the stale beton"
                )
        self._loader.traversal_order.indices = positions
        return self._loader

    def __iter__(self):
        # The beton holds the whole split; a subset (`rows`) is read by its positions in it.
        subset = np.searchsorted(self.split_rows, self.rows)
        order = rank_order(subset, self.seed, self.epoch, self.rank, self.world_size)
        n_batches = len(self)
        start = self._take_start()
        positions = order[start * self.batch_size : n_batches * self.batch_size]
        if len(positions) == 0:
            return
        loader = self._ffcv_loader(positions)
        with _torch_threads_kept():
            batches = iter(loader)
        try:
            for step, (images, sizes, labels, rows) in enumerate(batches, start):
                # FFCV reuses its output buffers a few batches later: keep nothing of them past this step.
                rows = rows.reshape(-1).clone()
                expected = self.split_rows[positions[(step - start) * self.batch_size :][: len(rows)]]
                if not np.array_equal(rows.numpy(), expected):
                    raise ValueError(f"{self.beton}: rows disagree with {self.data.root}; delete the stale beton")
                # Trim the split-wide padding to this batch's largest image, as the native backend pads.
                h, w = (int(v) for v in sizes.max(0).values)
                images = images[:, None, :h, :w]
                sizes = sizes.to(torch.int64)
                self.augment.generator.manual_seed(batch_seed(self.seed, self.epoch, step, self.rank))
                views = tuple(self.augment(images, sizes) for _ in range(self.views))
                if self.data.task == "multiclass":
                    labels = labels.reshape(-1).to(torch.int64, copy=True)
                else:
                    labels = labels.to(torch.int8, copy=True)
                yield Batch(views, labels, rows)
        finally:
            batches.close()  # stops FFCV's reader thread when the epoch is left early
