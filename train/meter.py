"""Reading a step's figures without stalling the device, and throughput over windows of steps.

`StepMeter.push` holds a step's figures (device tensors) and reads the previous step's: one device sync, made
after the next step is queued, so the device never idles while Python reads. Everything that logs or saves calls
`settle()` first, which reads the held step now and raises `NonFiniteLoss` on a non-finite loss, so a checkpoint
never holds the weights that follow a bad loss.

Throughput: `batches(loader, bar)` counts the time spent waiting for data (and owns the pass's progress bar), and
`window()` returns images/s and that wait as a fraction of the window, then starts the next window. The first step of
a meter (compilation, cuDNN autotuning and allocator growth all happen there) is settled at once and left out: the
first window is marked `"warmup": true` and its images/s covers only the steps after that first one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import torch


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or infinite; the message names the step and the epoch."""


class StepMeter:
    """One per training process; see the module docstring. `last` is the latest settled step's figures (floats);
    `epoch_means()` averages the settled figures since `new_epoch()`."""

    def __init__(self):
        self.last: dict[str, float] = {}
        self._pending: tuple[int, int, dict[str, torch.Tensor]] | None = None
        self._sums: dict[str, float] = {}
        self._count = 0
        self._warmed = False  # has the meter's first step been settled?
        self._warmup_window = True  # is the current window the one that held the first step?
        self._start = time.perf_counter()
        self._images = 0
        self._waited = 0.0
        self._bar = None  # the progress bar of the pass `batches` runs now

    # --- data wait ---------------------------------------------------------------------------------------------
    def batches(self, loader: Iterable, bar=None) -> Iterator:
        """Yields `loader`'s batches, adding the time spent waiting for each to the window's data wait. Closing this
        generator (a loop left early) closes the loader's epoch iterator too, which stops its threads.

        `bar`: this pass's progress bar (tqdm's interface: update, set_postfix, close; train/runlog.py `progress`),
        or None. Each `push()` while the pass runs advances it by one step, and it is closed when the pass ends,
        is left early or fails (the generator is closed as the loop is left, so an error line comes after the
        bar's last line)."""
        self._bar = bar
        it = iter(loader)
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                self._waited += time.perf_counter() - start
                yield batch
        finally:
            self._bar = None
            try:
                if hasattr(it, "close"):
                    it.close()
            finally:
                if bar is not None:
                    bar.close()

    # --- figures -----------------------------------------------------------------------------------------------
    def push(self, figures: dict[str, torch.Tensor], images: int, step: int = 0, epoch: int = 0) -> None:
        """Holds this step's figures and reads the previous step's, then advances the pass's progress bar, if any
        (`batches(loader, bar)`). `images` is what the step trained on (all processes); `step` and `epoch` name it
        in a NonFiniteLoss, which the read raises (the bar then stays where it was)."""
        self.settle()
        self._pending = (step, epoch, figures)
        if not self._warmed:  # the first step: read it now, and start the clock once it has finished
            self.settle()
            self._warmed = True
            self._start, self._images, self._waited = time.perf_counter(), 0, 0.0
        else:
            self._images += images
        if self._bar is not None:
            self._bar.update()

    def settle(self) -> None:
        """Reads the held step's figures (one device sync), checks the loss, adds them to the epoch's sums."""
        if self._pending is None:
            return
        step, epoch, figures = self._pending
        self._pending = None
        values = dict(zip(figures, torch.stack([v.float() for v in figures.values()]).tolist()))
        if not math.isfinite(values["loss"]):
            raise NonFiniteLoss(f"loss is {values['loss']} at step {step} (epoch {epoch})")
        self.last = values
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def epoch_means(self) -> dict[str, float]:
        """The mean of each settled figure since `new_epoch()`; empty if no step was settled."""
        return {k: v / self._count for k, v in self._sums.items()} if self._count else {}

    def new_epoch(self) -> None:
        """Clears the epoch's sums and restarts the window, so that evaluation and saving between epochs are not
        counted as training time."""
        self._sums, self._count = {}, 0
        self.restart()

    # --- throughput ----------------------------------------------------------------------------------------------
    def window(self) -> dict:
        """Throughput since the window began, then a new window. Call after `settle()`, so that the steps counted
        have finished. Keys: images_per_s (absent when the window holds only the warm-up step), data_wait (the
        fraction of the window spent waiting for batches), and "warmup": True for the window that held the
        meter's first step."""
        seconds = time.perf_counter() - self._start
        row: dict = {}
        if self._images:
            row["images_per_s"] = self._images / seconds
        row["data_wait"] = self._waited / seconds if seconds > 0 else 0.0
        if self._warmup_window:
            row["warmup"] = True
        self._warmup_window = not self._warmed
        self.restart()
        return row

    def restart(self) -> None:
        """Starts a new window now."""
        self._start, self._images, self._waited = time.perf_counter(), 0, 0.0
