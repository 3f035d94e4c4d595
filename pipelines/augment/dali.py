"""The spec walked in DALI operators: the ops, order and parameters of the native `Augment`, for the DALI backend.

Parameters are drawn on the host by `Augment.sample` and enter the graph through `fn.external_source` as per-sample
inputs, so DALI's own random generator draws nothing but noise pixels. `inputs(params, recipe)` makes them and
`graph(images, nodes, recipe, gpu)` consumes them, keyed by `input_names(recipe)`:
- a run of axis-aligned geometric ops (crop, flips) is `fn.slice` of its box (`run0_box_start`, `run0_box_shape`)
  and one `fn.resize` of a region of it, start and end (y, x) given per sample (`run0_roi_start`, `run0_roi_end`; a
  start past the end mirrors that axis);
- another geometric run (perspective, rotation) is one `warp_perspective` with the run's product matrix
  (`runK_matrix`);
- a pixel op's `dali` kernel gets its parameters (`runK_<key>`);
- where a run may or may not apply, its output is kept per sample by a 0/1 input (`runK`), the OR of its coins.
Ops and runs that the recipe leaves off build no operators. Where DALI computes something other than native, the op
says so (`Op.dali_deviation`); `deviations(recipe)` lists those that apply.
"""

from __future__ import annotations

import numpy as np
import torch

from twinray.pipelines.augment.ops import RUNS, Op
from twinray.pipelines.augment.pipeline import Params, run_applied, run_box, run_matrices
from twinray.pipelines.augment.recipes import Recipe


def _probability(run: tuple[Op, ...], recipe: Recipe) -> float:
    """The largest probability among the run's ops: 0 means the run builds nothing, 1 that it always applies."""
    return max(op.probability(recipe) for op in run)


def _active(recipe: Recipe) -> list[tuple[int, tuple[Op, ...]]]:
    return [(k, run) for k, run in enumerate(RUNS) if _probability(run, recipe) > 0]


def _is_resize(run: tuple[Op, ...]) -> bool:
    return run[0].geometric and all(op.axis_aligned for op in run)


def _keeps(run: tuple[Op, ...], recipe: Recipe) -> bool:
    """Whether the run's output is kept per sample by a coin: not for ops that always apply (nor for the crop)."""
    return run[0] is not RUNS[0][0] and _probability(run, recipe) < 1 and (run[0].geometric or run[0].coin)


def _fed(op: Op) -> tuple[str, ...]:
    """A pixel op's per-sample parameters (per-batch values stay on the host)."""
    return tuple(k for k in op.keys if k not in op.per_batch)


def input_names(recipe: Recipe) -> list[str]:
    """The names of the per-sample inputs that `graph` reads for `recipe`, in a fixed order."""
    names: list[str] = []
    for k, run in _active(recipe):
        names += [f"run{k}"] if _keeps(run, recipe) else []
        if _is_resize(run):
            names += [f"run{k}_box_start", f"run{k}_box_shape", f"run{k}_roi_start", f"run{k}_roi_end"]
        elif run[0].geometric:
            names += [f"run{k}_matrix"]
        else:
            names += [f"run{k}_{key}" for key in _fed(run[0])]
    return names


def inputs(params: Params, recipe: Recipe) -> dict[str, np.ndarray]:
    """One batch's parameters as DALI reads them: name -> array with the batch first (B, B x 2 or B x 3 x 3), int32
    for boxes and float32 for all else."""
    out: dict[str, torch.Tensor] = {}
    size = recipe.size
    for k, run in _active(recipe):
        if _keeps(run, recipe):
            out[f"run{k}"] = run_applied(run, params, recipe)
        if _is_resize(run):
            # The box is cut out first, so that resampling repeats its edge as torchvision's crop-then-resize does
            # (fn.resize of a region reads the pixels around it). In the box, x = m00 u + m02 - left and
            # y = m11 v + m12 - top: the outputs 0 and S give the region of interest.
            m, box = run_matrices(run, params, recipe), run_box(run, params, size)
            out[f"run{k}_box_start"], out[f"run{k}_box_shape"] = box[:, :2].int(), box[:, 2:].int()
            out[f"run{k}_roi_start"] = torch.stack([m[:, 1, 2], m[:, 0, 2]], 1) - box[:, :2]
            out[f"run{k}_roi_end"] = (
                torch.stack([m[:, 1, 1] * size + m[:, 1, 2], m[:, 0, 0] * size + m[:, 0, 2]], 1) - box[:, :2]
            )
        elif run[0].geometric:
            out[f"run{k}_matrix"] = run_matrices(run, params, recipe)
        else:
            values = params.of(run[0])
            out.update({f"run{k}_{key}": values[key] for key in _fed(run[0])})
    return {name: np.ascontiguousarray(value.numpy(), dtype=_dtype(value)) for name, value in out.items()}


def _dtype(value: torch.Tensor) -> type:
    """int32 for slice boxes (fn.slice takes integer coordinates), float32 for all else (coins as 0/1)."""
    return np.int32 if value.dtype == torch.int32 else np.float32


def deviations(recipe: Recipe) -> dict[str, str]:
    """op name -> how DALI's kernel differs from native's, for the ops that `recipe` uses."""
    return {op.name: op.dali_deviation for _, run in _active(recipe) for op in run if op.dali_deviation}


class Context:
    """What an op's `dali` kernel builds with: DALI's `fn` and `types`, and helpers that know where images live."""

    def __init__(self, gpu: bool):
        from nvidia.dali import fn, types

        self.fn, self.types, self.gpu = fn, types, gpu

    def on_device(self, node):
        """Per-sample inputs come from the host (named arguments need them there); arithmetic with the images needs
        them where the images are."""
        return node.gpu() if self.gpu and not isinstance(node, (int, float)) else node

    def clamp(self, node):
        from nvidia.dali import math as dmath

        return dmath.clamp(node, 0.0, 1.0)

    def op(self, name: str):
        """DALI 2.x moved equalize and warp_perspective out of `experimental`; older releases only have them there."""
        return getattr(self.fn, name, None) or getattr(self.fn.experimental, name)

    def keep(self, coin, applied, original):
        """Per sample: `applied` where the coin (a 0/1 float input) is 1, else `original`."""
        coin = self.on_device(coin)
        return coin * applied + (1.0 - coin) * original


def graph(images, nodes: dict, recipe: Recipe, gpu: bool):
    """The recipe as DALI operators. images: uint8 HWC (one channel) nodes of any size, where the pipeline's images
    live; nodes: `input_names(recipe)` -> per-sample CPU nodes. Returns float CHW nodes, 1 x S x S in [0, 1] (or
    normalised, as the recipe says)."""
    dali = Context(gpu)
    fn, types = dali.fn, dali.types
    size = (recipe.size, recipe.size)
    x = images
    for k, run in _active(recipe):
        if run[0].geometric:
            filter_ = types.INTERP_CUBIC if getattr(recipe, run[0].interpolation) == "bicubic" else types.INTERP_LINEAR
            if _is_resize(run):
                box = fn.slice(x, start=nodes[f"run{k}_box_start"], shape=nodes[f"run{k}_box_shape"], axis_names="HW")
                start, end = nodes[f"run{k}_roi_start"], nodes[f"run{k}_roi_end"]
                y = fn.resize(
                    box,
                    size=size,
                    roi_start=start,
                    roi_end=end,
                    interp_type=filter_,
                    antialias=False,
                    dtype=types.FLOAT,
                )
                y = y / 255.0 if k == 0 else y  # the first run reads the decoded uint8 images
            else:
                matrix = dali.on_device(nodes[f"run{k}_matrix"])
                y = dali.op("warp_perspective")(
                    x, matrix, inverse_map=True, border_mode="constant", fill_value=0, interp_type=filter_
                )
            y = dali.clamp(y) if filter_ == types.INTERP_CUBIC else y  # cubic overshoot
        else:
            y = run[0].dali(x, {key: nodes[f"run{k}_{key}"] for key in _fed(run[0])}, recipe, dali)
        x = dali.keep(nodes[f"run{k}"], y, x) if _keeps(run, recipe) else y
    return fn.transpose(x, perm=[2, 0, 1])  # HWC -> CHW


def apply_cpu(images: list[np.ndarray], params: Params, recipe: Recipe, seed: int = 0) -> torch.Tensor:
    """One batch through a DALI CPU pipeline with the given parameters (for tests and measurements).
    images: uint8 H x W arrays, sizes as in `params.sizes`. Returns float B x 1 x S x S; `seed` seeds DALI's noise."""
    from nvidia.dali import fn, pipeline_def

    names = input_names(recipe)
    values = inputs(params, recipe)
    batch = [np.ascontiguousarray(im[..., None]) for im in images]

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=seed, exec_dynamic=True)
    def pipeline():
        x = fn.external_source(name="images")
        nodes = {name: fn.external_source(name=name) for name in names}
        return graph(x, nodes, recipe, gpu=False)

    pipe = pipeline()
    pipe.build()
    pipe.feed_input("images", batch)
    for name in names:
        pipe.feed_input(name, values[name])
    (out,) = pipe.run()
    return torch.from_numpy(np.stack([np.asarray(out[i]) for i in range(len(images))]))
