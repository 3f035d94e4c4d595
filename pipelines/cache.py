"""The resident image cache: a split decoded once into one padded uint8 tensor, so later epochs decode nothing.

Layout: `pixels` is uint8 N x 1 x H_max x W_max, one slot per loader row (N rows, in row order), where H_max and
W_max are the largest height and width that index.npy records for those rows. Each image sits in the top-left
corner of its slot, zeros after it; `sizes` (int64 N x 2, height and width, on the CPU) says how much of the slot is
image. It takes N x H_max x W_max bytes, plus 16 N for the sizes (`cache_bytes`).

A batch is gathered cut to its own largest height and width, with the slots' zero padding after each image: the very
tensor `native.pad_batch` builds from freshly decoded images. The augmentation therefore sees the same input, draws
the same parameters from the same per-batch seed, and gives bit-identical views (tests/test_cache.py).

Where the pixels live (`where`):
- `device`: on the loader's device. A batch is one gather kernel: no decode, no host-to-device copy.
- `host`: in host RAM. A batch is gathered on the CPU; on CUDA into a pinned staging tensor that is copied without
  blocking. The cache itself is not pinned: torch's pinned allocator rounds each block up to a power of two (a 20 GB
  cache would page-lock 32 GB), and the copy reads the gathered batch, not the cache.
On the CPU both are host memory and one code path.

`choose` resolves `auto`: `device` when the cache fits in DEVICE_FRACTION of the device's free memory, else `host`
when it fits in HOST_FRACTION of the available RAM (shared by the ranks on this node), else `none`.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from twinray.cli import InputError

CACHES = ("none", "host", "device", "auto")
# Half the free device memory: the other half is for the model, its optimizer state, activations at the batch size,
# cuDNN workspaces and the augmentation's float batches (a ResNet-18 at batch 256, 224 px, bf16 needs a few GB).
DEVICE_FRACTION = 0.5
# Half the available RAM (psutil's `available`: free memory plus what the page cache can give back): the rest is
# for the process itself, the page cache of the memory-mapped shards, and whatever else runs on the node.
HOST_FRACTION = 0.5


def cache_bytes(data, rows: np.ndarray) -> int:
    """Bytes the cache of `rows` takes: N x H_max x W_max for the pixels + 16 N for the sizes, from index.npy."""
    if len(rows) == 0:
        return 0
    heights, widths = data.index["height"][rows], data.index["width"][rows]
    return len(rows) * int(heights.max()) * int(widths.max()) + 16 * len(rows)


def free_device_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device (torch.cuda.mem_get_info), in bytes."""
    return int(torch.cuda.mem_get_info(device)[0])


def available_ram_bytes() -> int:
    """Memory available to a new allocation without swapping (psutil, which accelerate already needs), in bytes."""
    import psutil

    return int(psutil.virtual_memory().available)


def ranks_on_this_node() -> int:
    """Processes on this node that each hold a host cache: LOCAL_WORLD_SIZE as torchrun and accelerate set it."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _gb(n: float) -> str:
    """Bytes in words: GB from 1 GB, MB from 1 MB, else kB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def choose(
    mode: str,
    needed: int,
    device_type: str,
    device_free: int | None,
    ram_available: int,
    ranks: int = 1,
) -> tuple[str, str]:
    """(`none`, `host` or `device`, a one-line reason) for the cache asked for.

    needed: bytes of one cache (`cache_bytes`); device_free: free device memory in bytes (None on the CPU);
    ram_available: available host memory in bytes; ranks: processes on this node, each with its own host cache.
    On the CPU `device` is host memory, so `auto` gives `host` when it fits. Raises ValueError for an unknown mode
    and InputError for an explicit `device` or `host` that cannot fit at all (all of the free memory, not the
    fraction).
    """
    if mode not in CACHES:
        raise ValueError(f"cache {mode!r} is not one of {', '.join(CACHES)}")
    size = f"the decoded images take {_gb(needed)}"
    host_needed = needed * ranks
    on_ram = f"{_gb(ram_available)} of available RAM" + (f", for {ranks} ranks on this node" if ranks > 1 else "")
    cpu = device_type != "cuda"
    if mode == "none":
        return "none", "cache none: images are decoded every epoch"
    if mode == "device" and not cpu:
        if needed > device_free:
            raise InputError(f"cache device: {size}, more than the {_gb(device_free)} free on the device")
        return "device", f"cache device (asked for): {size} on the device, {_gb(device_free)} free"
    if mode in ("host", "device"):  # on the CPU, device memory is host memory
        if host_needed > ram_available:
            raise InputError(f"cache {mode}: {size}{f' x {ranks} ranks' if ranks > 1 else ''}, more than the {on_ram}")
        where = "host memory, on the CPU one with device memory" if cpu else "host memory"
        return mode, f"cache {mode} (asked for): {size} in {where}; {on_ram}"
    fits_host = host_needed <= HOST_FRACTION * ram_available
    host_words = f"{'fits' if fits_host else 'does not fit'} in {HOST_FRACTION:.0%} of the {on_ram}"
    fallback = "host" if fits_host else "none"
    if cpu:
        return fallback, f"cache auto -> {fallback}: {size}, which {host_words} (on the CPU, host and device are one)"
    device_words = f"{_gb(device_free)} free on the device"
    if needed <= DEVICE_FRACTION * device_free:
        return "device", f"cache auto -> device: {size}, which fits in {DEVICE_FRACTION:.0%} of the {device_words}"
    return fallback, (
        f"cache auto -> {fallback}: {size}, more than {DEVICE_FRACTION:.0%} of the {device_words}, and {host_words}"
    )


def resolve(mode: str, data, rows: np.ndarray, device: torch.device) -> tuple[str, str]:
    """`choose` with this machine's numbers: the index's sizes, free device memory and available RAM."""
    if mode == "none":  # nothing to measure
        return choose(mode, 0, device.type, None, 0)
    cuda = device.type == "cuda"
    return choose(
        mode,
        cache_bytes(data, rows),
        device.type,
        free_device_bytes(device) if cuda and mode in ("auto", "device") else None,
        available_ram_bytes(),
        ranks_on_this_node(),
    )


class ImageCache:
    """The decoded images of `rows` (sorted dataset rows) in one zeroed uint8 N x 1 x H_max x W_max tensor, on
    `device` (where="device") or in host memory (where="host"); `put` fills it, `gather` reads batches from it."""

    def __init__(self, data, rows: np.ndarray, device: torch.device, where: str):
        if where not in ("host", "device"):
            raise ValueError(f"where {where!r} is not host or device")
        self.data, self.rows, self.device = data, np.asarray(rows, dtype=np.int64), torch.device(device)
        self.index_sizes = np.stack([data.index["height"][self.rows], data.index["width"][self.rows]], 1)
        self.index_sizes = self.index_sizes.astype(np.int64)
        h_max, w_max = (int(v) for v in self.index_sizes.max(0)) if len(self.rows) else (0, 0)
        self.storage = self.device if where == "device" else torch.device("cpu")
        self.pin = self.storage.type == "cpu" and self.device.type == "cuda"  # a staging tensor per batch
        # Zeros, so that a gathered batch's padding is pad_batch's.
        self.pixels = torch.zeros(len(self.rows), 1, h_max, w_max, dtype=torch.uint8, device=self.storage)
        self.sizes = torch.zeros(len(self.rows), 2, dtype=torch.int64)
        self.filled = 0  # slots [0, filled) hold their image

    @property
    def full(self) -> bool:
        return self.filled == len(self.rows)

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() + self.sizes.numel() * self.sizes.element_size()

    def slots(self, rows: np.ndarray) -> np.ndarray:
        """Cache slot of each dataset row (the rows must be among the cache's)."""
        return np.searchsorted(self.rows, rows)

    def put(self, start: int, images: torch.Tensor, sizes: torch.Tensor) -> None:
        """Stores a padded batch (uint8 B x 1 x H x W, as pad_batch makes, on any device) and its B x 2 sizes into
        slots [start, start + B), which must be the next to fill. Raises InputError naming the shard and row of an
        image whose decoded size is not the one index.npy records (it would not fit its slot)."""
        if start != self.filled:
            raise ValueError(f"cache slots fill in order: slot {start} given, {self.filled} next")
        sizes = sizes.cpu().to(torch.int64)
        stop = start + len(sizes)
        expected = torch.from_numpy(self.index_sizes[start:stop])
        wrong = (sizes != expected).any(1).nonzero()
        if len(wrong):
            k = int(wrong[0, 0])
            row = int(self.rows[start + k])
            shard = self.data.root / self.data.shard_names[int(self.data.index[row]["shard"])]
            (h, w), (h_index, w_index) = sizes[k].tolist(), expected[k].tolist()
            raise InputError(
                f"{shard}: row {row} decodes to {h} x {w} pixels, index.npy says {h_index} x {w_index}"
                f" (`python -m prep verify {self.data.root}` checks them all)"
            )
        h, w = images.shape[-2:]
        self.pixels[start:stop, :, :h, :w].copy_(images)
        self.sizes[start:stop] = sizes
        self.filled = stop
        if self.full and self.storage.type == "cuda":
            torch.cuda.current_stream(self.storage).synchronize()  # other streams (the loader's) read it next

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of `rows` as pad_batch would pad them: uint8 B x 1 x h x w on the loader's device (h, w the
        batch's largest height and width), and the B x 2 int64 sizes on the CPU."""
        slots = torch.from_numpy(self.slots(rows))
        sizes = self.sizes[slots]
        h, w = (int(v) for v in sizes.max(0).values)
        window = self.pixels[:, :, :h, :w]
        if self.storage.type == "cuda":  # the slot numbers go over pinned, so this thread never waits for the copy
            return window.index_select(0, slots.pin_memory().to(self.storage, non_blocking=True)), sizes
        batch = torch.empty(len(slots), 1, h, w, dtype=torch.uint8, pin_memory=self.pin)
        torch.index_select(window, 0, slots, out=batch)
        return batch.to(self.device, non_blocking=True), sizes
