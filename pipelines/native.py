"""The native backend: random access into memory-mapped shards, batched decode, augmentation on the device.

A background thread prepares whole batches (read, decode, augment) while the consumer trains on the current one:
- CPU: images decode in a thread pool (OpenCV releases the GIL), into a padded uint8 batch.
- CUDA: JPEG bytes go to `torchvision.io.decode_jpeg(device="cuda")` as one batch; npy needs no decode. Host
  batches are pinned and copied without blocking. Decode and augmentation run on a side CUDA stream, so they overlap
  the training step on the default stream; the consumer's stream waits on an event before it reads a batch.

With `cache` (pipelines/cache.py) the split is decoded once, in batches of FILL_BATCH through the same path, into
one padded uint8 tensor on the device (`device`) or in host memory (`host`) when the first epoch starts; each batch
is then a gather from it, which gives the same padded batch, so the same views, as decoding it again.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from twinray.pipelines.augment import Augment
from twinray.pipelines.base import Batch, LoaderBase, LoaderSettings, batch_seed
from twinray.pipelines.cache import ImageCache, resolve

_DONE = object()
FILL_BATCH = 256  # images decoded per batch while filling the cache


def pad_batch(images: list[torch.Tensor], pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """HxW (or 1xHxW) uint8 images -> a zero-padded B x 1 x Hmax x Wmax batch and the B x 2 sizes."""
    sizes = torch.tensor([im.shape[-2:] for im in images], dtype=torch.int64)
    h, w = (int(v) for v in sizes.max(0).values)
    if bool((sizes == sizes[0]).all()):  # one size (COVID's 299 px): one copy kernel, not one per image
        batch = torch.empty(len(images), 1, h, w, dtype=torch.uint8, device=images[0].device, pin_memory=pin)
        return torch.stack([im.reshape(1, h, w) for im in images], out=batch), sizes
    batch = torch.zeros(len(images), 1, h, w, dtype=torch.uint8, device=images[0].device, pin_memory=pin)
    for k, im in enumerate(images):
        batch[k, 0, : im.shape[-2], : im.shape[-1]] = im.reshape(im.shape[-2:])
    return batch, sizes


class NativeLoader(LoaderBase):
    def __init__(self, data, settings: LoaderSettings | None = None, prefetch: int = 3, cache: str = "none"):
        """`settings`: the loader contract's (LoaderSettings), its `workers` the decode threads; `prefetch` batches
        prepared ahead; `cache` none, host, device or auto (pipelines/cache.py). A cache is allocated here and filled
        when the first epoch starts; the choice is `cache_note` (LoaderBase). Raises InputError when an explicit host
        or device cache cannot fit."""
        super().__init__(data, settings)
        workers = self.settings.workers
        self.augment = Augment(self.recipe, device=self.device, seed=self.seed)
        labels = torch.from_numpy(np.ascontiguousarray(self.data.labels()))
        self.labels = labels if self.data.task == "multilabel" else labels.long()
        self.gpu_jpeg = self.device.type == "cuda" and self.data.encoding == "jpeg"
        self.pool = ThreadPoolExecutor(workers or len(os.sched_getaffinity(0)))
        self.prefetch = prefetch
        self.cache_mode, reason = resolve(cache, self.data, self.rows, self.device)
        if cache != "none":
            self.cache_note = f"{self.data.location} {self.split}: {reason}"
        self.cache = (
            None if self.cache_mode == "none" else ImageCache(self.data, self.rows, self.device, self.cache_mode)
        )

    def fill_cache(self) -> None:
        """Decodes every row into the cache, FILL_BATCH at a time through the usual decode path (nvJPEG on CUDA).
        The first epoch calls it; a damaged image stops it with the one line that names its shard and row."""
        cache = self.cache
        if cache is None or cache.full:
            return
        cache.filled = 0
        for start in range(0, len(self.rows), FILL_BATCH):
            rows = self.rows[start : start + FILL_BATCH]
            host = self._host_batch(rows)
            images, sizes = self._to_device(host, rows) if self.gpu_jpeg else host
            cache.put(start, images, sizes)

    def _host_batch(self, rows: np.ndarray):
        """What the background thread prepares: raw JPEG bytes for GPU decode, else a decoded padded batch."""
        if self.gpu_jpeg:
            with warnings.catch_warnings():  # the mmap is read-only; decode_jpeg only reads it
                warnings.simplefilter("ignore", UserWarning)
                return [torch.frombuffer(self.data.image_bytes(i), dtype=torch.uint8) for i in rows]
        images = self.pool.map(lambda i: torch.from_numpy(self.data.image(i)), rows)
        return pad_batch(list(images), pin=self.device.type == "cuda")

    def _to_device(self, host, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gpu_jpeg:
            from torchvision.io import ImageReadMode, decode_jpeg

            # torchvision's decoder allocates its outputs on this stream but writes them from a private one that
            # does not wait for this stream's queued work, so it may overwrite memory that the previous batch's
            # augmentation still reads (pytorch/vision#9606). Let that work finish first; only this thread waits.
            torch.cuda.current_stream(self.device).synchronize()
            try:
                decoded = decode_jpeg(host, mode=ImageReadMode.GRAY, device=self.device)
            except RuntimeError as e:  # nvJPEG's error names no image
                raise self.name_undecodable(rows, e) from None
            return pad_batch(decoded)
        batch, sizes = host
        return batch.to(self.device, non_blocking=True), sizes

    def _prepare(self, step: int, rows: np.ndarray) -> Batch:
        """One finished batch. The augmentation seed depends on (seed, epoch, step, rank) alone, so a resumed epoch
        draws the same views as an uninterrupted one."""
        if self.cache is not None:
            images, sizes = self.cache.gather(rows)
        else:
            images, sizes = self._to_device(self._host_batch(rows), rows)
        self.augment.generator.manual_seed(batch_seed(self.seed, self.epoch, step, self.rank))
        views = tuple(self.augment(images, sizes) for _ in range(self.views))
        labels = self.labels[rows].to(self.device, non_blocking=True)
        return Batch(views, labels, torch.from_numpy(rows.astype(np.int64)))

    def _producer(self, steps: list[tuple[int, np.ndarray]], out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:  # gives up once the consumer has left, so the thread always ends
            while not stop.is_set():
                try:
                    return out.put(item, timeout=0.1)
                except queue.Full:
                    continue

        # Stream contexts are per thread: this thread's CUDA work goes to the side stream.
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            for step, rows in steps:
                if stop.is_set():
                    return
                if stream is None:
                    put((self._prepare(step, rows), None))
                    continue
                with torch.cuda.stream(stream):
                    batch = self._prepare(step, rows)
                    ready = torch.cuda.Event()
                    ready.record(stream)
                put((batch, ready))
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)
        put(_DONE)

    def _release(self) -> None:
        if hasattr(self, "pool"):  # (not when __init__ failed before making it)
            self.pool.shutdown(wait=True, cancel_futures=True)  # its threads end now, not at garbage collection

    def _epoch(self):
        order = self.epoch_order()
        n_batches = len(self)
        steps = [order[k * self.batch_size : (k + 1) * self.batch_size] for k in range(n_batches)]
        start = self._take_start()
        self.fill_cache()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        todo = list(enumerate(steps))[start:]
        thread = threading.Thread(target=self._producer, args=(todo, q, stop), daemon=True)
        thread.start()
        try:
            for _ in todo:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                batch, ready = item
                if ready is not None:  # the consumer's stream waits for the side stream's work on this batch
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(ready)
                    for tensor in (*batch.views, batch.labels):
                        tensor.record_stream(current)  # freed memory is not reused while `current` may read it
                yield batch
        finally:
            stop.set()
            thread.join()  # it stops within a batch: two threads must never share self.augment
