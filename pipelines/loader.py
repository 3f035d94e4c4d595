"""`build_loader`, which picks the backend: the factory above the loader contract (pipelines/base.py) and the
backends that keep it (pipelines/native.py, dali_backend.py, ffcv_backend.py).

DALI and FFCV are optional extras: their backends import them when a loader of theirs is built, so importing this
module (or `twinray.pipelines`) needs neither.
"""

from __future__ import annotations

from twinray.pipelines.base import Batch, LoaderBase, LoaderSettings
from twinray.pipelines.cache import CACHES
from twinray.pipelines.dali_backend import DALILoader
from twinray.pipelines.ffcv_backend import FFCVLoader
from twinray.pipelines.native import NativeLoader

BACKENDS = ("native", "dali", "ffcv")
__all__ = ["BACKENDS", "Batch", "LoaderBase", "LoaderSettings", "build_loader"]


def build_loader(data, settings: LoaderSettings | None = None, backend: str = "native", cache: str = "none"):
    """A loader over a packed dataset (a directory or a URL); see pipelines/base.py for what it yields, and
    LoaderSettings for what `settings` holds (its defaults when None). `cache` (native backend): none, host, device
    or auto, the split decoded once and kept in memory (pipelines/cache.py); the CLIs default to auto, this
    function to none, since a loader read once gains nothing from it. Other backends take none or auto (which is
    none for them: DALI decodes on the GPU anyway, FFCV reads raw pixels)."""
    settings = LoaderSettings() if settings is None else settings
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if cache not in CACHES:
        raise ValueError(f"cache {cache!r} is not one of {', '.join(CACHES)}")
    if backend != "native" and cache not in ("none", "auto"):
        raise ValueError(f"cache {cache!r} is a native-backend option; backend {backend!r} takes none or auto")
    if settings.batch_size < 1 or settings.views < 1:
        raise ValueError(f"batch_size ({settings.batch_size}) and views ({settings.views}) must be at least 1")
    if backend == "native":
        return NativeLoader(data, settings, cache=cache)
    if backend == "dali":
        return DALILoader(data, settings)
    return FFCVLoader(data, settings)
