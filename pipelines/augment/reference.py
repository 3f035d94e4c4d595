"""The study's augmentation list in torchvision, one image at a time: the reference that both backends are checked
against (tests/test_parity.py) and measured against (bench/augment_order.py).

The study ran torchvision transforms in this order: RandomResizedCrop, RandomHorizontalFlip, RandomVerticalFlip,
RandomEqualize, GaussianBlur, RandomPerspective, then its Gaussian noise (../shared/notes/datasets.md). The ops it
scanned and dropped sit where its baseline (bench/pipeline.py) puts them: ColorJitter after equalize, RandomRotation
after the perspective. Crops are resized without antialiasing, as twinray's kernels resize.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from twinray.pipelines.augment import geometry
from twinray.pipelines.augment.recipes import Recipe

MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def study_functional(
    image: torch.Tensor, params, k: int, recipe: Recipe, equalize: Callable = TF.equalize
) -> torch.Tensor:
    """Sample k of `params` (an `Augment.sample` result) through torchvision.transforms.v2.functional in the study's
    order: uint8 1 x H x W -> float 1 x S x S in [0, 1] (noise left out: its pixels are random). `equalize` takes
    and returns uint8 1 x H x W (another kernel, such as OpenCV's, may stand in for torchvision's)."""
    p, size = params, recipe.size
    top, left, h, w = p.boxes[k].tolist()
    x = TF.resized_crop(image.float(), top, left, h, w, [size, size], MODES[recipe.interpolation], antialias=False)
    x = x.clamp(0, 255)  # bicubic overshoot
    if p.hflip[k]:
        x = TF.horizontal_flip(x)
    if p.vflip[k]:
        x = TF.vertical_flip(x)
    if p.equalize[k]:
        x = equalize(x.round().to(torch.uint8)).float()
    x = x / 255
    if p.brightness_contrast[k]:
        x = TF.adjust_contrast(TF.adjust_brightness(x, float(p.brightness[k])), float(p.contrast[k]))
    if p.blur[k]:
        x = TF.gaussian_blur(x, [recipe.blur_kernel] * 2, [float(p.blur_sigma[k])] * 2)
    return study_warps(x, p, k, recipe)


def study_warps(x: torch.Tensor, params, k: int, recipe: Recipe) -> torch.Tensor:
    """Perspective, then rotation, on float 1 x S x S, with fill 0. Both at once are one homography resampled once,
    as twinray resamples a run of geometric ops: torchvision's perspective, given where the product of the two maps
    sends the corners. (Applying them one after the other would interpolate twice.)"""
    p, size, mode = params, recipe.size, MODES[recipe.warp_interpolation]
    if p.perspective[k] and p.rotation[k]:
        product = geometry.perspective_matrix(p.start_points[k : k + 1], p.end_points[k : k + 1])[0]
        product = product @ geometry.rotation_matrix(p.angles[k : k + 1], size)[0]
        corners = torch.tensor([[0, 0, 1], [size, 0, 1], [size, size, 1], [0, size, 1]], dtype=torch.float64)
        sources = corners @ product.T
        sources = (sources[:, :2] / sources[:, 2:]).tolist()
        return TF.perspective(x, sources, corners[:, :2].tolist(), interpolation=mode, fill=0)
    if p.perspective[k]:
        x = TF.perspective(x, p.start_points[k].tolist(), p.end_points[k].tolist(), interpolation=mode, fill=0)
    if p.rotation[k]:
        x = TF.rotate(x, float(p.angles[k]), interpolation=mode, fill=0)
    return x


class StudyNoise:
    """The study's noise on a float image in [0, 1]: sigma = image mean x U(a, b), clipped to [0, 1]."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sigma = x.mean() * (self.low + (self.high - self.low) * torch.rand(()))
        return (x + torch.randn_like(x) * sigma).clamp(0, 1)


def study_transforms(recipe: Recipe, equalize: Callable | None = None) -> v2.Compose:
    """The study's list as torchvision transforms that draw their own parameters (from torch's global generator),
    on uint8 1 x H x W tensors (uint8 between ops, as the study's PIL images were) -> float 1 x S x S.
    `equalize`: a uint8 kernel to use in place of RandomEqualize's."""
    r, size, warp = recipe, recipe.size, MODES[recipe.warp_interpolation]
    equalizer = v2.RandomEqualize(r.equalize) if equalize is None else v2.RandomApply([equalize], r.equalize)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, r.crop_scale, r.crop_ratio, MODES[r.interpolation], antialias=False),
            v2.RandomHorizontalFlip(r.hflip),
            v2.RandomVerticalFlip(r.vflip),
            equalizer,
            v2.RandomApply([v2.ColorJitter(brightness=r.brightness, contrast=r.contrast)], r.brightness_contrast),
            v2.RandomApply([v2.GaussianBlur(r.blur_kernel, r.blur_sigma)], r.blur),
            v2.RandomPerspective(r.perspective_distortion, r.perspective, warp),
            v2.RandomApply([v2.RandomRotation(r.rotation_degrees, warp)], r.rotation),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([StudyNoise(*r.noise_mean_fraction)], r.noise),
        ]
    )
