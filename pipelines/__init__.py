"""Loaders and batched augmentation over the packed format: `build_loader(data, LoaderSettings(...))` and
`pipelines.augment`."""

from twinray.pipelines.loader import BACKENDS, Batch, LoaderSettings, build_loader

__all__ = ["BACKENDS", "Batch", "LoaderSettings", "build_loader"]
