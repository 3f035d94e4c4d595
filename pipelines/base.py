"""The loader contract that every backend keeps: `LoaderSettings`, `Batch` and `LoaderBase`, which the backends
(pipelines/native.py, dali_backend.py, ffcv_backend.py) subclass; pipelines/loader.py's `build_loader` picks one.

A loader yields `Batch`es: `views` (each B x 1 x S x S float on the device, channels_last), `labels` and the
sample `indices` (rows of the dataset's index.npy). Each epoch reshuffles with (seed, epoch); each rank takes a
disjoint, equal-sized shard; `set_epoch(epoch, start_step)` resumes mid-epoch without repeating a step.

A loader owns threads (a producer thread, decode pools, DALI pipelines, FFCV's reader thread). `close()` stops them
and waits for them to end, and so does leaving `with build_loader(...) as loader:`. An epoch left early stops its
threads once its iterator is closed or freed, which a pending exception's traceback can delay; `close()` does not
wait for that. A thread still inside a native call when the interpreter shuts down can abort the process
("terminate called without an active exception"), so nothing here is left to garbage collection.
"""

from __future__ import annotations

import atexit
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from twinray.cli import InputError
from twinray.pipelines.augment import Recipe, load_recipe
from twinray.prep.open_dataset import open_dataset
from twinray.prep.shard_cache import CacheSettings


@dataclass(frozen=True)
class LoaderSettings:
    """What a loader reads and yields, whichever backend: `build_loader(data, settings, backend=...)`.

    split: the split read; batch_size; device (batches and augmentation); recipe: a name, a YAML path or a Recipe,
    scaled to `size`, the output side; views per sample; seed: shuffling and augmentation; rank and world_size: this
    process's share of each epoch; drop_last: the last, partial batch left out; workers: decode threads (the
    backend's own default when None); rows: a subset of the split's rows (a label fraction, say), None for all;
    shard_cache: how a URL dataset is read (prep/shard_cache.py), None for the defaults and the environment.
    Change one with `dataclasses.replace(settings, split="val")`."""

    split: str = "train"
    batch_size: int = 128
    device: str | torch.device = "cpu"
    recipe: str | Recipe = "seed-final"
    size: int = 224
    views: int = 2
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True
    workers: int | None = None
    rows: object = None  # a sequence of row numbers, or None
    shard_cache: CacheSettings | None = None


@dataclass
class Batch:
    views: tuple[torch.Tensor, ...]
    labels: torch.Tensor  # int64 B (multiclass) or int8 B x C codes with -128 for missing (multilabel)
    indices: torch.Tensor  # int64 B, rows of index.npy


class LoaderBase:
    """What every backend shares: the split's rows, the recipe at the output size, the epoch length, and where the
    next epoch starts. Backends add how they read, decode and augment.

    `cache_note`: one line on where a cache was put and why (None without one). The loader does not print it: a
    script prints it with its first epoch line, after that epoch is saved, so a reader that has left (`| head`) costs
    no work and an error stays the only line on stderr."""

    cache_note: str | None = None

    def __init__(self, data, settings: LoaderSettings | None = None):
        """`data`: a packed dataset's directory or URL (opened here: prep/open_dataset.py); `settings`: what the
        loader reads and yields (LoaderSettings; its defaults when None)."""
        settings = LoaderSettings() if settings is None else settings
        split, rows, world_size = settings.split, settings.rows, settings.world_size
        self.settings = settings
        self.data = open_dataset(data, settings.shard_cache)
        self.split = split
        self.split_rows = self.data.indices(split)
        self.rows = self.split_rows if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        if not np.isin(self.rows, self.split_rows).all():
            raise ValueError(f"{data}: some of the rows given are not in split {split!r}")
        if len(self.rows) < world_size:
            raise ValueError(f"{data}: split {split!r} holds {len(self.rows)} samples, fewer than {world_size} ranks")
        self.device = torch.device(settings.device)
        # the recipe at this size: pixel-valued parameters scaled from its reference size (Recipe.at_size)
        recipe = settings.recipe
        self.recipe = (load_recipe(recipe) if isinstance(recipe, str) else recipe).at_size(settings.size)
        self.batch_size, self.views, self.seed = settings.batch_size, settings.views, settings.seed
        self.rank, self.world_size, self.drop_last = settings.rank, world_size, settings.drop_last
        self.epoch, self.start_step = 0, 0
        self.closed = False
        self._open_epochs: weakref.WeakSet = weakref.WeakSet()  # epoch iterators not yet finished or closed
        _UNCLOSED.add(self)

    def __iter__(self) -> Iterator[Batch]:
        """One epoch (see set_epoch). Its threads start with the first batch asked for, and stop when the epoch
        ends or its iterator is closed."""
        if self.closed:
            raise RuntimeError("this loader is closed")
        epoch = self._epoch()
        self._open_epochs.add(epoch)
        return epoch

    def _epoch(self) -> Iterator[Batch]:
        """Each backend's epoch: a generator that releases what it started in a `finally`."""
        raise NotImplementedError

    def close(self) -> None:
        """Stops this loader's threads and pipelines and waits for them to end: every epoch iterator still open is
        closed (so its `finally` runs now), then the backend's own resources go (`_release`). Idempotent; a closed
        loader cannot start another epoch. Call it from the thread that iterates."""
        for epoch in list(self._open_epochs):
            epoch.close()
        if not self.closed:
            self.closed = True
            _UNCLOSED.discard(self)
            self._release()

    def _release(self) -> None:
        """What a backend holds beyond an epoch (a decode pool, say); called once, by close()."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        per_rank = len(self.rows) // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration runs `epoch`, starting after the `start_step` batches already done."""
        self.epoch, self.start_step = epoch, start_step

    def _take_start(self) -> int:
        """The step this epoch starts at; resuming applies to one epoch only."""
        start, self.start_step = self.start_step, 0
        return start

    def epoch_order(self) -> np.ndarray:
        """This rank's rows for the current epoch, in order."""
        return rank_order(self.rows, self.seed, self.epoch, self.rank, self.world_size)

    def name_undecodable(self, rows, error: Exception) -> Exception:
        """GPU decoders (nvJPEG, DALI) fail without naming the image. Decoding `rows` with cv2 names its shard and
        row (a InputError); where they all decode, the decoder's own error stands."""
        for row in rows:
            try:
                self.data.image(int(row))
            except InputError as named:
                return named
        return error


_UNCLOSED: weakref.WeakSet[LoaderBase] = weakref.WeakSet()  # loaders alive and not closed, for the exit hook


@atexit.register
def close_unclosed_loaders() -> None:
    """At exit, while the interpreter is still whole, closes the loaders that their owners left open.

    Python's shutdown ends a daemon thread by unwinding it (pthread_exit) the next time it asks for the GIL. A
    producer thread that is then inside a torch op (which releases the GIL in a noexcept C++ scope) makes that
    unwind call std::terminate: "terminate called without an active exception", exit code 134 (pytorch/pytorch
    #38228). atexit hooks run before that point. A loader that is in use by another thread now is left alone."""
    for loader in list(_UNCLOSED):
        try:
            loader.close()
        except ValueError:  # "generator already executing": another thread is iterating it
            pass


def rank_order(rows: np.ndarray, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's rows for one epoch: one permutation shared by all ranks (seeded by seed and epoch), cut to a
    multiple of world_size, then every world_size-th row from position `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    order = rows[np.random.default_rng([seed, epoch]).permutation(len(rows))]
    usable = len(order) // world_size * world_size
    return order[:usable][rank::world_size]


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The augmentation seed of one batch: a resumed run draws the same views as an uninterrupted one."""
    return int(np.random.default_rng([seed, epoch, step, rank, 0x7A1]).integers(0, 2**62))
