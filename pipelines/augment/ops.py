"""The augmentation spec: every op of a recipe, written once, in the one order that every backend walks (`SPEC`).

Order: the study's torchvision list (RandomResizedCrop, horizontal flip, vertical flip, equalize, Gaussian blur,
RandomPerspective, Gaussian noise; docs/augmentation.md has the measurements behind keeping it). The two ops the
study scanned and dropped sit where its torchvision baseline (`bench/pipeline.py`) puts them: brightness/contrast
after equalize, rotation after perspective. Normalisation, when a recipe asks for it, comes last.

Each op is split the way torchvision's transforms v2 splits a transform:
- `make_params` draws the op's per-sample parameters from a CPU generator (torchvision's `make_params`). Ops with a
  probability also get a coin, drawn first and stored under the op's name. Both backends take these same
  parameters, so one seed gives the same crops, flips, sigmas and angles on either.
- Kernels apply them (torchvision's functional kernels). Native (`Augment`): a geometric op gives a 3x3 matrix
  (output -> input coordinates), and each run of consecutive geometric ops is resampled once (`geometry.warp`); a
  pixel op's `native` kernel gets a float batch in [0, 1] of the samples its coin picked. DALI (`augment.dali`): a
  geometric run is `fn.slice` of the crop's box and one `fn.resize` when every op in it is axis-aligned (crop,
  flips), else one `warp_perspective`; a pixel op's `dali` kernel builds its DALI operators.

`dali_deviation` is the one place that says where DALI's kernel does not compute what the native one does
(docs/augmentation.md lists them with their measured size; tests/test_parity.py pins them down).
Adding an op: one `Op` here, and its probability and parameter fields in `Recipe`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from twinray.pipelines.augment import geometry, intensity

if TYPE_CHECKING:
    from twinray.pipelines.augment.recipes import Recipe


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _no_params(r: Recipe, sizes: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Op:
    """One augmentation op: how its parameters are drawn and how each backend applies them.

    name: its probability's `Recipe` field, its coin in `Params`, and (with '-' for '_') its token in recipe names.
    keys: the `Params` entries `make_params` returns, each with the batch as its first dimension except those named
    in `per_batch` (one value per batch, such as noise's seed, which only native uses).
    make_params(recipe, sizes, generator): sizes is B x 2 int64 (height, width of each input image).
    matrix(params, size): geometric ops only, B x 3 x 3 float64 from output to input pixel coordinates (pixel k spans
    [k, k + 1]); the walker uses the identity where the coin is off.
    native(x, params, recipe, generator_device): pixel ops, float B' x 1 x S x S in [0, 1] of the selected samples,
    with `params` cut to those samples.
    dali(x, params, recipe, dali): pixel ops, DALI nodes: x is float HWC in [0, 1]; `params` maps keys to per-sample
    CPU nodes; `dali` is the walker's context (`augment.dali.Context`: fn, types, on_device, clamp, op).
    """

    name: str
    keys: tuple[str, ...] = ()
    per_batch: tuple[str, ...] = ()
    make_params: Callable[..., dict[str, Any]] = _no_params
    coin: bool = True  # False: applied to every sample, or to none, as `enabled` says (the crop, normalisation)
    enabled: Callable[..., bool] = lambda recipe: True  # ops without a coin: whether the recipe uses them
    matrix: Callable[..., torch.Tensor] | None = None
    axis_aligned: bool = False  # geometric ops that only scale, shift and mirror each axis
    interpolation: str = "interpolation"  # geometric ops: the Recipe field naming their filter
    native: Callable[..., torch.Tensor] | None = None
    dali: Callable[..., Any] | None = None
    dali_deviation: str | None = None

    @property
    def geometric(self) -> bool:
        return self.matrix is not None

    def probability(self, recipe: Recipe) -> float:
        """The recipe's probability for this op; 1 or 0 for an op without a coin."""
        if not self.coin:
            return 1.0 if self.enabled(recipe) else 0.0
        return float(getattr(recipe, self.name))


# --- crop and flips: axis-aligned, so native's warp takes its separable path and DALI resizes a region ------------


def _crop_params(r: Recipe, sizes: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    top, left, h, w = geometry.sample_crops(sizes[:, 0], sizes[:, 1], r.crop_scale, r.crop_ratio, gen)
    return {"boxes": torch.stack([top, left, h, w], 1)}


def _crop_matrix(p: dict[str, Any], size: int) -> torch.Tensor:
    return geometry.crop_matrix(*p["boxes"].unbind(1), size)


CROP = Op(
    "crop",
    keys=("boxes",),
    make_params=_crop_params,
    coin=False,
    matrix=_crop_matrix,
    axis_aligned=True,
    dali_deviation=(
        "bicubic: DALI's cubic filter is Catmull-Rom (Keys' a = -0.5, PIL's), torch's uses a = -0.75, which rings "
        "more at sharp edges; bilinear crops agree to float precision"
    ),
)
HFLIP = Op("hflip", matrix=lambda p, size: geometry.mirror_matrix(len(p["hflip"]), size, axis=0), axis_aligned=True)
VFLIP = Op("vflip", matrix=lambda p, size: geometry.mirror_matrix(len(p["vflip"]), size, axis=1), axis_aligned=True)


# --- pixel ops on the crop ---------------------------------------------------------------------------------------


def _equalize_native(x: torch.Tensor, p, r: Recipe, device) -> torch.Tensor:
    return intensity.equalize((x * 255).round_().to(torch.uint8)).float().div_(255)


def _equalize_dali(x, p, r: Recipe, dali):
    fn, types = dali.fn, dali.types
    levels = fn.cast(x * 255.0, dtype=types.UINT8)  # rounds to nearest, as native's round() does except on ties
    return fn.cast(dali.op("equalize")(levels), dtype=types.FLOAT) / 255.0


EQUALIZE = Op(
    "equalize",
    native=_equalize_native,
    dali=_equalize_dali,
    dali_deviation=(
        "DALI's equalize is OpenCV's equalizeHist (each level maps to the cumulative count up to and including it), "
        "torchvision's is PIL's (the count before it, spread over all pixels but the top level's): the mapped levels "
        "differ, most where one level holds many pixels"
    ),
)


def _brightness_contrast_params(r: Recipe, sizes: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    n = len(sizes)
    return {
        "brightness": _uniform(n, max(0.0, 1 - r.brightness), 1 + r.brightness, gen),
        "contrast": _uniform(n, max(0.0, 1 - r.contrast), 1 + r.contrast, gen),
    }


def _brightness_contrast_dali(x, p, r: Recipe, dali):
    # ColorJitter's brightness, then contrast about the image mean, in arithmetic: the mean is computed where the
    # image is, which a named argument (contrast_center) would not accept on a GPU.
    b, c = dali.on_device(p["brightness"]), dali.on_device(p["contrast"])
    bright = dali.clamp(x * b)
    return dali.clamp(c * bright + (1.0 - c) * dali.fn.reductions.mean(bright))


BRIGHTNESS_CONTRAST = Op(
    "brightness_contrast",
    keys=("brightness", "contrast"),
    make_params=_brightness_contrast_params,
    native=lambda x, p, r, device: intensity.brightness_contrast(x, p["brightness"], p["contrast"]),
    dali=_brightness_contrast_dali,
)

BLUR = Op(
    "blur",
    keys=("blur_sigma",),
    make_params=lambda r, sizes, gen: {"blur_sigma": _uniform(len(sizes), *r.blur_sigma, gen)},
    native=lambda x, p, r, device: intensity.gaussian_blur(x, p["blur_sigma"], r.blur_kernel),
    dali=lambda x, p, r, dali: dali.fn.gaussian_blur(x, sigma=p["blur_sigma"], window_size=r.blur_kernel),
)


# --- perspective and rotation: one homography per sample, resampled once -----------------------------------------


def _perspective_params(r: Recipe, sizes: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    start, end = geometry.sample_perspective_points(len(sizes), r.size, r.perspective_distortion, gen)
    return {"start_points": start, "end_points": end}


WARP_DEVIATION = (
    "DALI's warp_perspective blends the zero fill into the pixels along the edge of the warped image, as "
    "torchvision does; native cuts there (one pixel band)"
)
PERSPECTIVE = Op(
    "perspective",
    keys=("start_points", "end_points"),
    make_params=_perspective_params,
    matrix=lambda p, size: geometry.perspective_matrix(p["start_points"], p["end_points"]),
    interpolation="warp_interpolation",
    dali_deviation=WARP_DEVIATION,
)
ROTATION = Op(
    "rotation",
    keys=("angles",),
    make_params=lambda r, sizes, gen: {"angles": _uniform(len(sizes), -r.rotation_degrees, r.rotation_degrees, gen)},
    matrix=lambda p, size: geometry.rotation_matrix(p["angles"], size),
    interpolation="warp_interpolation",
    dali_deviation=WARP_DEVIATION,
)


# --- noise and normalisation --------------------------------------------------------------------------------------


def _noise_params(r: Recipe, sizes: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    n = len(sizes)
    if r.noise_sigma is not None:
        factor = torch.full((n,), float(r.noise_sigma), dtype=torch.float64)
    else:  # the study's sigma: image mean x U(a, b)
        factor = _uniform(n, *r.noise_mean_fraction, gen)
    return {"noise_sigma_factor": factor, "noise_seed": int(torch.randint(0, 2**62, (1,), generator=gen))}


def _noise_native(x: torch.Tensor, p, r: Recipe, device) -> torch.Tensor:
    factor = p["noise_sigma_factor"].to(x, non_blocking=True)
    sigma = factor if r.noise_sigma is not None else factor * x.mean(dim=(1, 2, 3))
    return intensity.gaussian_noise(x, sigma, torch.Generator(device=device).manual_seed(p["noise_seed"]))


def _noise_dali(x, p, r: Recipe, dali):
    factor = dali.on_device(p["noise_sigma_factor"])
    sigma = factor if r.noise_sigma is not None else factor * dali.fn.reductions.mean(x)
    unit = dali.fn.noise.gaussian(x, stddev=1.0) - x  # N(0, 1) per pixel, scaled where x lives
    return dali.clamp(x + unit * sigma)


NOISE = Op(
    "noise",
    keys=("noise_sigma_factor", "noise_seed"),
    per_batch=("noise_seed",),
    make_params=_noise_params,
    native=_noise_native,
    dali=_noise_dali,
    dali_deviation="DALI draws the noise pixels from its own generator: same distribution, other values",
)


def _normalize_dali(x, p, r: Recipe, dali):
    mean, std = r.normalize
    return (x - mean) / std


NORMALIZE = Op(
    "normalize",
    coin=False,
    enabled=lambda recipe: recipe.normalize is not None,
    native=lambda x, p, r, device: (x - r.normalize[0]) / r.normalize[1],
    dali=_normalize_dali,
)

SPEC: tuple[Op, ...] = (
    CROP,
    HFLIP,
    VFLIP,
    EQUALIZE,
    BRIGHTNESS_CONTRAST,
    BLUR,
    PERSPECTIVE,
    ROTATION,
    NOISE,
    NORMALIZE,
)
OPS: dict[str, Op] = {op.name: op for op in SPEC}
PROBABILITIES: tuple[str, ...] = tuple(op.name for op in SPEC if op.coin)  # the Recipe fields that are probabilities


def runs(spec: tuple[Op, ...] = SPEC) -> list[tuple[Op, ...]]:
    """The spec cut into what each backend applies in one go: each run of consecutive geometric ops (one
    resampling) and each pixel op alone. Ops in one run must share their interpolation field."""
    out: list[list[Op]] = []
    for op in spec:
        if op.geometric and out and out[-1][0].geometric:
            if op.interpolation != out[-1][0].interpolation:
                raise ValueError(f"{op.name} is fused with {out[-1][0].name} but names another interpolation field")
            out[-1].append(op)
        else:
            out.append([op])
    return [tuple(run) for run in out]


def _check(spec: tuple[Op, ...]) -> None:
    """The spec's invariants: the crop first (it sets the output size), unique parameter names, one kernel kind."""
    if spec[0] is not CROP:
        raise ValueError("the crop must come first: it sets the output size")
    seen: set[str] = {"sizes"}
    for op in spec:
        names = ((op.name,) if op.coin else ()) + op.keys
        if seen & set(names):
            raise ValueError(f"{op.name}: parameter name(s) {sorted(seen & set(names))} used twice")
        seen |= set(names)
        if op.geometric == (op.native is not None) or op.geometric == (op.dali is not None):
            raise ValueError(f"{op.name}: a geometric op has a matrix, a pixel op native and dali kernels")


_check(SPEC)
RUNS: list[tuple[Op, ...]] = runs()
