"""`Augment`: one recipe applied to a batch, with random parameters drawn per sample.

Order: the geometric ops (crop, flips, perspective, rotation) are fused into one 3x3 matrix per sample and one
resampling pass; then equalize, brightness/contrast, blur and noise, each on the samples its coin selects.
Parameters come from a CPU `torch.Generator` (so a seed gives the same views on any device); noise is drawn on the
device from a seed taken from that generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from twinray.pipelines.augment import geometry, intensity
from twinray.pipelines.augment.recipes import Recipe, load_recipe


@dataclass
class Params:
    """Everything random about one batch, on the CPU."""

    sizes: torch.Tensor  # B x 2 int64: height, width of each image inside the padded batch
    boxes: torch.Tensor  # B x 4 int64: top, left, height, width of each crop
    hflip: torch.Tensor  # B bool
    vflip: torch.Tensor
    perspective: torch.Tensor  # B bool
    start_points: torch.Tensor  # B x 4 x 2
    end_points: torch.Tensor
    rotation: torch.Tensor  # B bool
    angles: torch.Tensor  # B degrees
    equalize: torch.Tensor
    brightness_contrast: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor
    noise: torch.Tensor
    noise_sigma_factor: torch.Tensor  # the noise sigma is this x the image mean (or a fixed sigma)
    noise_seed: int

    def matrices(self, size: int) -> torch.Tensor:
        """Output -> source coordinates: crop @ flips @ perspective @ rotation."""
        top, left, height, width = self.boxes.unbind(1)
        m = geometry.crop_matrix(top, left, height, width, size) @ geometry.flip_matrix(self.hflip, self.vflip, size)
        eye = torch.eye(3, dtype=torch.float64)
        persp = geometry.perspective_matrix(self.start_points, self.end_points)
        m = m @ torch.where(self.perspective[:, None, None], persp, eye)
        rot = geometry.rotation_matrix(self.angles, size)
        return m @ torch.where(self.rotation[:, None, None], rot, eye)


class Augment:
    """uint8 (or [0, 1] float) B x 1 x H x W, a padded batch -> float B x 1 x S x S, channels_last, on `device`."""

    def __init__(self, recipe: Recipe | str = "seed-final", device="cpu", dtype=torch.float32, seed: int = 0):
        self.recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, heights: torch.Tensor, widths: torch.Tensor) -> Params:
        r, g, n = self.recipe, self.generator, len(heights)

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, generator=g) < p

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)

        top, left, h, w = geometry.sample_crops(heights, widths, r.crop_scale, r.crop_ratio, g)
        start, end = geometry.sample_perspective_points(n, r.size, r.perspective_distortion, g)
        noise_factor = (
            torch.full((n,), float(r.noise_sigma), dtype=torch.float64)
            if r.noise_sigma is not None
            else uniform(*r.noise_mean_fraction)
        )
        return Params(
            sizes=torch.stack([heights, widths], 1),
            boxes=torch.stack([top, left, h, w], 1),
            hflip=coin(r.hflip),
            vflip=coin(r.vflip),
            perspective=coin(r.perspective),
            start_points=start,
            end_points=end,
            rotation=coin(r.rotation),
            angles=uniform(-r.rotation_degrees, r.rotation_degrees),
            equalize=coin(r.equalize),
            brightness_contrast=coin(r.brightness_contrast),
            brightness=uniform(max(0.0, 1 - r.brightness), 1 + r.brightness),
            contrast=uniform(max(0.0, 1 - r.contrast), 1 + r.contrast),
            blur=coin(r.blur),
            blur_sigma=uniform(*r.blur_sigma),
            noise=coin(r.noise),
            noise_sigma_factor=noise_factor,
            noise_seed=int(torch.randint(0, 2**62, (1,), generator=g)),
        )

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        r = self.recipe
        x = images.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = geometry.replicate_edges(x, params.sizes[:, 0], params.sizes[:, 1])
        x = geometry.warp(x, params.matrices(r.size), params.boxes, r.size, r.interpolation)
        if r.interpolation == "bicubic":
            x = x.clamp_(0, 1)  # cubic overshoot

        def subset(mask: torch.Tensor) -> torch.Tensor:
            return mask.nonzero().squeeze(1).to(self.device, non_blocking=True)  # masks live on the CPU: no sync

        if params.equalize.any():
            i = subset(params.equalize)
            x[i] = intensity.equalize((x[i] * 255).round_().to(torch.uint8)).float().div_(255)
        if params.brightness_contrast.any():
            i = subset(params.brightness_contrast)
            m = params.brightness_contrast
            x[i] = intensity.brightness_contrast(x[i], params.brightness[m], params.contrast[m])
        if params.blur.any():
            i = subset(params.blur)
            x[i] = intensity.gaussian_blur(x[i], params.blur_sigma[params.blur], r.blur_kernel)
        if params.noise.any():
            i = subset(params.noise)
            factor = params.noise_sigma_factor[params.noise].to(x, non_blocking=True)
            sigma = factor if r.noise_sigma is not None else factor * x[i].mean(dim=(1, 2, 3))
            gen = torch.Generator(device=self.device).manual_seed(params.noise_seed)
            x[i] = intensity.gaussian_noise(x[i], sigma, gen)
        if r.normalize is not None:
            mean, std = r.normalize
            x = (x - mean) / std
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """`sizes`: B x 2 (height, width) of each image inside the padded batch; default the full tensor."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"Augment takes B x 1 x H x W, got {tuple(images.shape)}")
        if sizes is None:
            sizes = torch.tensor([images.shape[-2:]] * images.shape[0])
        sizes = sizes.cpu().to(torch.int64)
        return self.apply(images, self.sample(sizes[:, 0], sizes[:, 1]))
