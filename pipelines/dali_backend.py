"""The DALI backend: the same shards and contract, with decode and the recipe expressed in DALI ops.

Samples enter through `fn.external_source` in this rank's epoch order (the index gives each image's bytes as a
slice of the memory-mapped shard), so order, sharding and resume follow the same rules as the native loader.
Decoding runs with device='mixed' (nvJPEG) on a GPU and 'cpu' without one (`device_id=None`). Each op is drawn per
sample: a coin picks between the op's output and its input. Perspective matrices are drawn by twinray's own
`geometry` code, with torchvision's meaning, and applied by `fn.experimental.warp_perspective`.

DALI's random state cannot be set per batch, but a pipeline built with the same seed draws the same sequence. So a
resumed epoch replays the batches before its start point and drops them: its views are bit-identical to an
uninterrupted epoch's, at the cost of loading those batches once more.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from twinray.pipelines.augment import geometry
from twinray.pipelines.loader import Batch, LoaderBase
from twinray.prep.format import decode_image

MISSING_EXTRA = "backend 'dali' needs the dali extra: pip install 'twinray[dali]'"
PREFETCH = 2  # batches DALI prepares ahead of the one handed out


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ValueError(MISSING_EXTRA) from None


class _EpochSource:
    """Per-batch inputs for external_source: encoded images (or decoded npy), labels, rows, perspective matrices."""

    def __init__(self, loader: DALILoader):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        order = ld.epoch_order()
        steps = [order[k * ld.batch_size : (k + 1) * ld.batch_size] for k in range(len(ld))]
        rng = torch.Generator().manual_seed(int(np.random.default_rng([ld.seed, ld.epoch, ld.rank]).integers(2**62)))
        for rows in steps:  # from the epoch's start, even when resuming (see DALILoader.__iter__)
            if ld.data.encoding == "npy":
                images = [decode_image(ld.data.image_bytes(i), "npy")[..., None] for i in rows]
            else:
                images = [np.frombuffer(ld.data.image_bytes(i), dtype=np.uint8) for i in rows]
            labels = [np.asarray(ld.labels[i]) for i in rows]
            matrices = []  # one list of 3x3 per view, only when the recipe uses perspective
            if ld.recipe.perspective > 0:
                matrices = [[m.numpy() for m in self._perspectives(len(rows), rng)] for _ in range(ld.views)]
            yield (images, labels, [np.array(i, dtype=np.int64) for i in rows], *matrices)

    def _perspectives(self, n: int, rng: torch.Generator) -> torch.Tensor:
        r = self.loader.recipe
        start, end = geometry.sample_perspective_points(n, r.size, r.perspective_distortion, rng)
        apply = torch.rand(n, generator=rng) < r.perspective
        eye = torch.eye(3, dtype=torch.float64)
        return torch.where(apply[:, None, None], geometry.perspective_matrix(start, end), eye).float()


def _build_pipeline(loader: DALILoader, device_id: int | None, threads: int):
    from nvidia.dali import fn, pipeline_def, types

    r = loader.recipe
    interp = types.INTERP_CUBIC if r.interpolation == "bicubic" else types.INTERP_LINEAR
    encoded = loader.data.encoding != "npy"

    def on_device(node):
        """Random draws are made on the CPU (operators take their named arguments from there); arithmetic with
        the images needs them where the images are."""
        return node.gpu() if device_id is not None and not isinstance(node, (int, float)) else node

    def uniform(low: float, high: float):
        """A per-sample draw from [low, high]; DALI refuses an empty range, so a fixed value stays a constant."""
        return fn.random.uniform(range=(low, high)) if high > low else low

    def maybe(p: float, applied, original):
        """Per sample: the op's output with probability p, else its input."""
        if p <= 0:
            return original
        if p >= 1:
            return applied
        coin = on_device(fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT))
        return coin * applied + (1.0 - coin) * original

    # A fresh pipeline per epoch, seeded by (seed, epoch, rank): epochs differ and a rerun repeats them.
    seed = int(np.random.default_rng([loader.seed, loader.epoch, loader.rank]).integers(2**31))

    @pipeline_def(
        batch_size=loader.batch_size,
        num_threads=threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=PREFETCH,
        exec_dynamic=True,
    )
    def pipeline():
        images, labels, rows, *matrices = fn.external_source(
            source=_EpochSource(loader),
            num_outputs=3 + (loader.views if r.perspective > 0 else 0),
            batch=True,
            cycle="raise",
            parallel=False,
        )
        if encoded:
            images = fn.decoders.image(
                images, device="mixed" if device_id is not None else "cpu", output_type=types.GRAY
            )
        elif device_id is not None:
            images = images.gpu()
        views = []
        for v in range(loader.views):
            x = fn.random_resized_crop(
                images,
                size=(r.size, r.size),
                random_area=list(r.crop_scale),
                random_aspect_ratio=list(r.crop_ratio),
                interp_type=interp,
            )
            x = fn.flip(
                x,
                horizontal=fn.random.coin_flip(probability=r.hflip),
                vertical=fn.random.coin_flip(probability=r.vflip),
            )
            if r.equalize > 0:
                x = fn.cast(maybe(r.equalize, _op(fn, "equalize")(x), x), dtype=types.UINT8)
            if r.perspective > 0:
                m = matrices[v].gpu() if device_id is not None else matrices[v]
                x = _op(fn, "warp_perspective")(
                    x, m, inverse_map=True, border_mode="constant", fill_value=0, interp_type=types.INTERP_LINEAR
                )
            if r.rotation > 0:
                angle = uniform(-r.rotation_degrees, r.rotation_degrees)
                angle = angle * fn.cast(fn.random.coin_flip(probability=r.rotation), dtype=types.FLOAT)
                x = fn.rotate(x, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_LINEAR)
            x = fn.cast(x, dtype=types.FLOAT) / 255.0
            if r.brightness_contrast > 0:
                # ColorJitter's brightness then contrast about the image mean, in arithmetic: the mean is computed
                # where the image is, which a named argument (contrast_center) would not accept on a GPU.
                b = on_device(uniform(max(0.0, 1 - r.brightness), 1 + r.brightness))
                c = on_device(uniform(max(0.0, 1 - r.contrast), 1 + r.contrast))
                bright = math_clamp(x * b)
                jitter = math_clamp(c * bright + (1.0 - c) * fn.reductions.mean(bright))
                x = maybe(r.brightness_contrast, jitter, x)
            if r.blur > 0:
                sigma = uniform(*r.blur_sigma)
                x = maybe(r.blur, fn.gaussian_blur(x, sigma=sigma, window_size=r.blur_kernel), x)
            if r.noise > 0:
                if r.noise_sigma is not None:
                    sigma = r.noise_sigma
                else:  # the study's sigma: image mean x U(a, b)
                    sigma = fn.reductions.mean(x) * on_device(uniform(*r.noise_mean_fraction))
                unit = fn.noise.gaussian(x, stddev=1.0) - x  # N(0, 1) per pixel; scaled by sigma where x lives
                x = maybe(r.noise, math_clamp(x + unit * sigma), x)
            if r.normalize is not None:
                x = (x - r.normalize[0]) / r.normalize[1]
            views.append(fn.transpose(x, perm=[2, 0, 1]))  # HWC -> CHW
        return (*views, labels, rows)

    return pipeline()


def _op(fn, name: str):
    """DALI 2.x moved equalize and warp_perspective out of `experimental`; older releases only have them there."""
    return getattr(fn, name, None) or getattr(fn.experimental, name)


def math_clamp(x):
    from nvidia.dali import math as dmath

    return dmath.clamp(x, 0.0, 1.0)


class DALILoader(LoaderBase):
    def __init__(self, data, workers: int | None = None, **contract):
        """`contract`: build_loader's keywords (split, batch_size, device, recipe, size, views, seed, rank,
        world_size, drop_last); `workers` DALI threads."""
        _import_dali()
        super().__init__(data, **contract)
        self.labels = np.ascontiguousarray(self.data.labels())
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.threads = workers or len(os.sched_getaffinity(0))

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        output_map = [f"view{v}" for v in range(self.views)] + ["labels", "rows"]
        skip = self._take_start()  # batches replayed and dropped, so that DALI's random draws line up
        pipeline = _build_pipeline(self, self.device_id, self.threads)
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator(
            pipeline, output_map, last_batch_policy=policy, auto_reset=False, prepare_first_batch=False
        )
        step = 0
        try:
            for step, out in enumerate(iterator):
                if step < skip:
                    continue
                batch = out[0]
                views = tuple(
                    batch[f"view{v}"].to(self.device).contiguous(memory_format=torch.channels_last)
                    for v in range(self.views)
                )
                labels = batch["labels"].to(self.device)
                labels = labels.long() if self.data.task == "multiclass" else labels
                yield Batch(views, labels, batch["rows"].cpu().long())
        except RuntimeError as e:  # DALI reports a bad image as a "Critical error in pipeline", naming none
            working_on = self.epoch_order()[step * self.batch_size :][: (PREFETCH + 2) * self.batch_size]  # + margin
            raise self.name_undecodable(working_on, e) from None
        finally:
            del iterator, pipeline
