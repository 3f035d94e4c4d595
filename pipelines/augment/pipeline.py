"""`Augment`: one recipe applied to a batch by walking the spec (`ops.SPEC`), with parameters drawn per sample.

`sample` runs each op's `make_params` in spec order (coins first) on a CPU `torch.Generator`, so a seed gives the
same views on any device and the same parameters to the DALI backend. `apply` walks `ops.RUNS`: each run of
consecutive geometric ops is one resampling pass over the samples any of its coins picked (the first run, which holds
the crop, covers every sample); each pixel op runs on the samples its coin picked. Noise is drawn on the device from
a seed taken from the generator.
"""

from __future__ import annotations

from typing import Any

import torch

from twinray.pipelines.augment import geometry
from twinray.pipelines.augment.ops import RUNS, SPEC, Op
from twinray.pipelines.augment.recipes import Recipe, load_recipe


class Params:
    """Everything random about one batch, on the CPU: `sizes` (B x 2 int64, each image's height and width inside the
    padded batch) and, for each op of the spec, its coin under its name (B bool) and what its `make_params` drew
    (e.g. `boxes` B x 4 int64 top/left/height/width, `angles` B float64 degrees). Entries read and write as
    attributes: `params.perspective[:] = True`, `params.angles = torch.tensor(...)`."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "values", values)

    def __getattr__(self, name: str):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(f"Params has no {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        if name not in self.values:
            raise AttributeError(f"Params has no {name!r}")
        self.values[name] = value

    def __len__(self) -> int:
        return len(self.values["sizes"])

    def of(self, op: Op, mask: torch.Tensor | None = None) -> dict[str, Any]:
        """The op's coin and parameters, cut to the samples in `mask` (per-batch values, noise's seed, stay whole)."""
        names = ((op.name,) if op.coin else ()) + op.keys
        values = {k: self.values[k] for k in names}
        if mask is None:
            return values
        return {k: v if k in op.per_batch else v[mask] for k, v in values.items()}


def applied(op: Op, params: Params, recipe: Recipe) -> torch.Tensor:
    """B bool: the samples that `op` changes. An op without a coin changes all or none, by the recipe."""
    if op.coin:
        return params.values[op.name]
    return torch.full((len(params),), op.probability(recipe) > 0)


def run_applied(run: tuple[Op, ...], params: Params, recipe: Recipe) -> torch.Tensor:
    """B bool: the samples that any op of the run changes."""
    mask = torch.zeros(len(params), dtype=torch.bool)
    for op in run:
        mask |= applied(op, params, recipe)
    return mask


def run_matrices(run: tuple[Op, ...], params: Params, recipe: Recipe) -> torch.Tensor:
    """B x 3 x 3 float64, output -> input pixel coordinates: the product of the run's matrices in spec order, each
    the identity where the op is off."""
    eye = torch.eye(3, dtype=torch.float64)
    m = eye.repeat(len(params), 1, 1)
    for op in run:
        m = m @ torch.where(applied(op, params, recipe)[:, None, None], op.matrix(params.of(op), recipe.size), eye)
    return m


def run_box(run: tuple[Op, ...], params: Params, size: int) -> torch.Tensor:
    """B x 4 int64 (top, left, height, width): what a geometric run reads, the crop's box or the whole S x S image."""
    if run[0].name == "crop":
        return params.boxes
    return torch.tensor([[0, 0, size, size]], dtype=torch.int64).expand(len(params), 4)


class Augment:
    """uint8 (or [0, 1] float) B x 1 x H x W, a padded batch -> float B x 1 x S x S, channels_last, on `device`."""

    def __init__(self, recipe: Recipe | str = "seed-final", device="cpu", dtype=torch.float32, seed: int = 0):
        self.recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, heights: torch.Tensor, widths: torch.Tensor) -> Params:
        """Every op's coin and parameters for B images of the given sizes (int64 B each), drawn in spec order.
        Ops that the recipe leaves off are drawn too, so that switching one on leaves the others' draws alone."""
        r, g = self.recipe, self.generator
        sizes = torch.stack([heights, widths], 1).to(torch.int64)
        values: dict[str, Any] = {"sizes": sizes}
        for op in SPEC:
            if op.coin:
                values[op.name] = torch.rand(len(sizes), generator=g) < op.probability(r)
            values.update(op.make_params(r, sizes, g))
        return Params(values)

    def _subset(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.nonzero().squeeze(1).to(self.device, non_blocking=True)  # masks live on the CPU: no sync

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        r = self.recipe
        x = images.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = geometry.replicate_edges(x, params.sizes[:, 0], params.sizes[:, 1])
        for run in RUNS:
            if run[0].geometric:
                x = self._resample(x, run, params)
                continue
            op = run[0]
            mask = applied(op, params, r)
            if not mask.any():
                continue
            if mask.all():
                x = op.native(x, params.of(op), r, self.device)
            else:
                i = self._subset(mask)
                x[i] = op.native(x[i], params.of(op, mask), r, self.device)
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    def _resample(self, x: torch.Tensor, run: tuple[Op, ...], params: Params) -> torch.Tensor:
        """One resampling pass for a run of geometric ops, on the samples any of its coins picked."""
        r = self.recipe
        mask = run_applied(run, params, r)
        if not mask.any():
            return x
        interpolation = getattr(r, run[0].interpolation)
        m, box = run_matrices(run, params, r), run_box(run, params, r.size)
        if mask.all():
            x = geometry.warp(x, m, box, r.size, interpolation)
            return x.clamp_(0, 1) if interpolation == "bicubic" else x  # cubic overshoot
        i = self._subset(mask)
        warped = geometry.warp(x[i], m[mask], box[mask], r.size, interpolation)
        x[i] = warped.clamp_(0, 1) if interpolation == "bicubic" else warped
        return x

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """`sizes`: B x 2 (height, width) of each image inside the padded batch; default the full tensor."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"Augment takes B x 1 x H x W, got {tuple(images.shape)}")
        if sizes is None:
            sizes = torch.tensor([images.shape[-2:]] * images.shape[0])
        sizes = sizes.cpu().to(torch.int64)
        return self.apply(images, self.sample(sizes[:, 0], sizes[:, 1]))
