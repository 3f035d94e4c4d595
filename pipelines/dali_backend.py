"""The DALI backend: the same shards and contract, with decode and the recipe expressed in DALI ops.

Samples enter through `fn.external_source` in this rank's epoch order (the index gives each image's bytes as a
slice of the memory-mapped shard), so order, sharding and resume follow the same rules as the native loader.
Decoding runs with device='mixed' (nvJPEG) on a GPU and 'cpu' without one (`device_id=None`). The augmentation is
the spec that the native backend walks (`augment.ops.SPEC`), walked in DALI operators by `augment.dali`: each batch's
parameters are drawn by `Augment.sample` with the native loader's per-batch seed and fed through the external source,
so both backends give a batch the same crops, flips, angles and sigmas (`augment.dali.deviations` says what differs).

Only noise pixels come from DALI's random state, which cannot be set per batch; a pipeline built with the same seed
draws the same sequence. So a resumed epoch replays the batches before its start point and drops them: its views are
bit-identical to an uninterrupted epoch's, at the cost of loading those batches once more.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from twinray.pipelines.augment import Augment
from twinray.pipelines.augment import dali as dali_augment
from twinray.pipelines.base import Batch, LoaderBase, LoaderSettings, batch_seed
from twinray.prep.format import decode_image

MISSING_EXTRA = "backend 'dali' needs the dali extra: pip install 'twinray[dali]'"
PREFETCH = 2  # batches DALI prepares ahead of the one handed out


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ValueError(MISSING_EXTRA) from None


class _EpochSource:
    """Per-batch inputs for external_source: encoded images (or decoded npy), labels, rows, then each view's
    augmentation parameters (`augment.dali.input_names`)."""

    def __init__(self, loader: DALILoader):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        order = ld.epoch_order()
        steps = [order[k * ld.batch_size : (k + 1) * ld.batch_size] for k in range(len(ld))]
        names = dali_augment.input_names(ld.recipe)
        for step, rows in enumerate(steps):  # from the epoch's start, even when resuming (see DALILoader.__iter__)
            if ld.data.encoding == "npy":
                images = [decode_image(ld.data.image_bytes(i), "npy")[..., None] for i in rows]
            else:
                images = [np.frombuffer(ld.data.image_bytes(i), dtype=np.uint8) for i in rows]
            labels = [np.asarray(ld.labels[i]) for i in rows]
            # The native loader's draws for this batch: the same seed, the same order of views.
            ld.sampler.generator.manual_seed(batch_seed(ld.seed, ld.epoch, step, ld.rank))
            heights = torch.from_numpy(ld.data.index["height"][rows].astype(np.int64))
            widths = torch.from_numpy(ld.data.index["width"][rows].astype(np.int64))
            params = []
            for _ in range(ld.views):
                values = dali_augment.inputs(ld.sampler.sample(heights, widths), ld.recipe)
                params += [values[name] for name in names]
            yield (images, labels, [np.array(i, dtype=np.int64) for i in rows], *params)


def _build_pipeline(loader: DALILoader, device_id: int | None, threads: int):
    from nvidia.dali import fn, pipeline_def, types

    r = loader.recipe
    encoded = loader.data.encoding != "npy"
    names = dali_augment.input_names(r)

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
        images, labels, rows, *params = fn.external_source(
            source=_EpochSource(loader),
            num_outputs=3 + loader.views * len(names),
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
            nodes = dict(zip(names, params[v * len(names) : (v + 1) * len(names)]))
            views.append(dali_augment.graph(images, nodes, r, gpu=device_id is not None))
        return (*views, labels, rows)

    return pipeline()


class DALILoader(LoaderBase):
    def __init__(self, data, settings: LoaderSettings | None = None):
        """`settings`: the loader contract's (LoaderSettings), its `workers` DALI's threads."""
        _import_dali()
        super().__init__(data, settings)
        workers = self.settings.workers
        self.labels = np.ascontiguousarray(self.data.labels())
        self.sampler = Augment(self.recipe, seed=self.seed)  # draws each batch's parameters; DALI applies them
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.threads = workers or len(os.sched_getaffinity(0))

    def _epoch(self):
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
                labels = labels if self.data.task == "multilabel" else labels.long()
                yield Batch(views, labels, batch["rows"].cpu().long())
        except RuntimeError as e:  # DALI reports a bad image as a "Critical error in pipeline", naming none
            working_on = self.epoch_order()[step * self.batch_size :][: (PREFETCH + 2) * self.batch_size]  # + margin
            raise self.name_undecodable(working_on, e) from None
        finally:
            _shut_down(pipeline)
            del iterator, pipeline


def _shut_down(pipeline) -> None:
    """Stops a DALI pipeline's threads now. A pipeline holds reference cycles, so `del` frees it only at some later
    garbage collection, run by whichever thread allocates then; DALI shuts down the pipelines still alive at exit
    (`nvidia.dali.pipeline._shutdown_pipelines`) through this same method."""
    shutdown = getattr(pipeline, "_shutdown", None)
    if shutdown is not None:
        shutdown()
