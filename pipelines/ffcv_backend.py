"""The FFCV backend: a split converted once to a .beton file, read by `ffcv.loader.Loader`, augmented by twinray.

The beton is packing, so prep/ffcv_pack.py writes it (each grey image raw, zero-padded, beside its size, label and
row); this backend only reads it. Decoding is then a memcpy, and twinray's `Augment` does the rest, as in the native
backend. Beton position k is `data.indices(split)[k]`, so the order of rows (and of the views) is the native
backend's.

Each epoch sets the `Loader`'s order to this rank's positions (`rank_order`, as the native backend shuffles), which
OrderOption.SEQUENTIAL follows as given: FFCV's own shuffling and distributed sampler play no part, and resuming is
a matter of skipping rows.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path

import numpy as np
import torch

from twinray.pipelines.augment import Augment
from twinray.pipelines.base import Batch, LoaderBase, LoaderSettings, batch_seed, rank_order
from twinray.prep.ffcv_pack import beton_path, require_ffcv, torch_threads_kept, write_beton


class FFCVLoader(LoaderBase):
    """The loader contract (see pipelines/base.py) over a .beton; same arguments as NativeLoader, plus `beton`
    (default `<data>/ffcv/<split>.beton`, written if missing or older than the dataset's manifest)."""

    def __init__(self, data, settings: LoaderSettings | None = None, prefetch: int = 3, beton=None):
        """`settings`: the loader contract's (LoaderSettings), its `workers` FFCV's threads; `prefetch` batches
        ahead, `beton` the file (default `<data>/ffcv/<split>.beton`)."""
        require_ffcv()
        import numba  # lazy: FFCV's dependency, installed with the ffcv extra only

        super().__init__(data, settings)
        workers = self.settings.workers
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
            label_decoder = NDArrayDecoder() if self.data.task == "multilabel" else IntDecoder()
            with torch_threads_kept():
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

    def _release(self) -> None:
        self._loader = None  # its reader thread has ended with the epoch that started it

    def _epoch(self):
        # The beton holds the whole split; a subset (`rows`) is read by its positions in it.
        subset = np.searchsorted(self.split_rows, self.rows)
        order = rank_order(subset, self.seed, self.epoch, self.rank, self.world_size)
        n_batches = len(self)
        start = self._take_start()
        positions = order[start * self.batch_size : n_batches * self.batch_size]
        if len(positions) == 0:
            return
        loader = self._ffcv_loader(positions)
        with torch_threads_kept():
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
                if self.data.task == "multilabel":
                    labels = labels.to(torch.int8, copy=True)
                else:  # multiclass, or unlabeled (LABEL_NONE)
                    labels = labels.reshape(-1).to(torch.int64, copy=True)
                yield Batch(views, labels, rows)
        finally:
            _stop_reader(batches)


def _stop_reader(batches) -> None:
    """Ends an epoch's FFCV reader thread and waits for it (ffcv 1.0.2's EpochIterator), rather than leave a daemon
    thread running numba code into the interpreter's shutdown.

    Its close() only sets an event, which the thread reads when a put into its full output queue times out (0.5 s):
    until then it goes on filling batches. At the epoch's end it puts an end marker without a timeout, which blocks
    for good when the queue is full: take a batch out to let it finish."""
    batches.close()
    batches.join(timeout=1.0)
    while batches.is_alive():  # blocked on the end marker, or still filling a slow batch
        try:
            batches.output_queue.get_nowait()
        except queue.Empty:
            pass
        batches.join(timeout=1.0)
