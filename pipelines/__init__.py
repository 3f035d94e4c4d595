"""Loaders and batched augmentation over the packed format: `build_loader(...)` and `pipelines.augment`."""

from twinray.pipelines.loader import BACKENDS, Batch, build_loader

__all__ = ["BACKENDS", "Batch", "build_loader"]
