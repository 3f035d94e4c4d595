"""Per-pixel ops on batched grey images, each with its own parameters per sample.

Float images hold values in [0, 1], as torchvision's float images do. Per-sample parameters may come from the CPU;
they are copied with non_blocking=True, which never waits for the GPU (a blocking copy would stall its stream).
Where torchvision already has a batched kernel that takes per-sample images as they are (equalize), we call it
rather than write it again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation with a 256-bin histogram per image: uint8 B x 1 x H x W in, uint8 out.
    Exactly torchvision's `equalize` (PIL's algorithm), which is batched and runs on any device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"equalize takes uint8 B x 1 x H x W, got {images.dtype} {tuple(images.shape)}")
    return TF.equalize(images)


def gaussian_kernels(sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """B x K normalised 1-D Gaussians, sampled as torchvision's gaussian_blur samples them."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=sigmas.device, dtype=sigmas.dtype)
    pdf = torch.exp(-0.5 * (x[None, :] / sigmas[:, None]) ** 2)
    return pdf / pdf.sum(1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable blur, one sigma per image, reflect padding (torchvision's): float B x 1 x H x W."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"blur kernel size must be odd and positive, got {kernel_size}")
    b = images.shape[0]
    k = gaussian_kernels(sigmas.to(device=images.device, dtype=images.dtype, non_blocking=True), kernel_size)
    pad = kernel_size // 2
    x = F.pad(images, (pad, pad, pad, pad), mode="reflect").transpose(0, 1)  # 1 x B x H x W: a group per image
    x = F.conv2d(x, k.view(b, 1, 1, kernel_size), groups=b)
    x = F.conv2d(x, k.view(b, 1, kernel_size, 1), groups=b)
    return x.transpose(0, 1)


def gaussian_noise(images: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Adds N(0, sigma^2) per image and clips to [0, 1]."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (images + noise * sigmas.to(images, non_blocking=True)[:, None, None, None]).clamp_(0, 1)


def brightness_contrast(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """ColorJitter's brightness then contrast, one factor each per image: x*b, then blend with the image mean."""
    x = (images * brightness.to(images, non_blocking=True)[:, None, None, None]).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = contrast.to(images, non_blocking=True)[:, None, None, None]
    return (c * x + (1 - c) * mean).clamp(0, 1)
