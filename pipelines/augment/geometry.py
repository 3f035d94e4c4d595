"""Geometric ops as 3x3 matrices; a run of consecutive ones is resampled in one pass (`warp`).

Coordinates are continuous pixel coordinates: pixel k covers [k, k+1] and its centre is k + 0.5 (the convention of
`grid_sample(align_corners=False)` and of torchvision's resize, perspective and rotate kernels). Every matrix maps
*output* coordinates of its op to *input* coordinates, so consecutive ops applied as crop -> flips sample the source
at  crop @ flips @ [u, v, 1], and perspective -> rotation at  perspective @ rotation @ [u, v, 1].

Parameters are drawn per sample, with the same meaning as torchvision's RandomResizedCrop, RandomHorizontalFlip,
RandomVerticalFlip, RandomPerspective and RandomRotation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _randint(low: torch.Tensor, high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Integers in [low, high) per element, like torch.randint with tensor bounds."""
    u = torch.rand(low.shape, generator=gen, dtype=torch.float64)
    return (low + torch.floor(u * (high - low).to(torch.float64)).to(low.dtype)).clamp(max=high - 1)


def sample_crops(heights: torch.Tensor, widths: torch.Tensor, scale, ratio, gen: torch.Generator, attempts: int = 10):
    """RandomResizedCrop boxes (top, left, height, width) inside each image's own extent: up to `attempts` draws of
    area and log-uniform aspect ratio, else the centre crop clamped to `ratio` (torchvision's fallback)."""
    n = len(heights)
    h_img, w_img = heights.to(torch.float64), widths.to(torch.float64)
    area = (h_img * w_img)[:, None]
    target = area * _uniform(n * attempts, *scale, gen).view(n, attempts)
    log_ratio = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), gen).view(n, attempts)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= w_img[:, None]) & (h <= h_img[:, None])
    first = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    h_pick, w_pick = h[rows, first.clamp(min=0)], w[rows, first.clamp(min=0)]

    # Fallback: the whole image, trimmed to the allowed aspect ratio.
    in_ratio = w_img / h_img
    fb_w = torch.where(
        in_ratio < ratio[0], w_img, torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img)
    )
    fb_h = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    use_fb = first < 0
    h_pick = torch.where(use_fb, fb_h, h_pick).to(torch.int64)
    w_pick = torch.where(use_fb, fb_w, w_pick).to(torch.int64)
    top = _randint(torch.zeros(n, dtype=torch.int64), heights - h_pick + 1, gen)
    left = _randint(torch.zeros(n, dtype=torch.int64), widths - w_pick + 1, gen)
    top = torch.where(use_fb, (heights - h_pick) // 2, top)
    left = torch.where(use_fb, (widths - w_pick) // 2, left)
    return top, left, h_pick, w_pick


def crop_matrix(top, left, height, width, size: int) -> torch.Tensor:
    """Output S x S of a resized crop -> the source image."""
    m = torch.zeros(len(top), 3, 3, dtype=torch.float64)
    m[:, 0, 0] = width.to(torch.float64) / size
    m[:, 1, 1] = height.to(torch.float64) / size
    m[:, 0, 2] = left.to(torch.float64)
    m[:, 1, 2] = top.to(torch.float64)
    m[:, 2, 2] = 1
    return m


def mirror_matrix(n: int, size: int, axis: int) -> torch.Tensor:
    """n copies of the mirror x -> S - x (axis 0, a horizontal flip) or y -> S - y (axis 1, a vertical flip)."""
    m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    m[:, axis, axis], m[:, axis, 2] = -1.0, float(size)
    return m


def sample_perspective_points(n: int, size: int, distortion: float, gen: torch.Generator):
    """RandomPerspective.get_params for an S x S image: start corners and jittered end corners, (n, 4, 2)."""
    half = size // 2
    d = int(distortion * half)

    def ints(low, high):  # [low, high) per sample
        return _randint(torch.full((n,), low, dtype=torch.int64), torch.full((n,), high, dtype=torch.int64), gen)

    top_left = torch.stack([ints(0, d + 1), ints(0, d + 1)], 1)
    top_right = torch.stack([ints(size - d - 1, size), ints(0, d + 1)], 1)
    bottom_right = torch.stack([ints(size - d - 1, size), ints(size - d - 1, size)], 1)
    bottom_left = torch.stack([ints(0, d + 1), ints(size - d - 1, size)], 1)
    end = torch.stack([top_left, top_right, bottom_right, bottom_left], 1).to(torch.float64)
    start = torch.tensor([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], dtype=torch.float64)
    return start.expand(n, 4, 2), end


def perspective_matrix(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """The homography taking end points (output) to start points (input), solved per sample as torchvision does,
    and applied to continuous coordinates as torchvision's perspective kernel applies it."""
    n = len(start)
    a = torch.zeros(n, 8, 8, dtype=torch.float64)
    b = start.reshape(n, 8)
    x, y = end[..., 0], end[..., 1]
    u, v = start[..., 0], start[..., 1]
    a[:, 0::2, 0], a[:, 0::2, 1], a[:, 0::2, 2] = x, y, 1
    a[:, 1::2, 3], a[:, 1::2, 4], a[:, 1::2, 5] = x, y, 1
    a[:, 0::2, 6], a[:, 0::2, 7] = -u * x, -u * y
    a[:, 1::2, 6], a[:, 1::2, 7] = -v * x, -v * y
    coeffs = torch.linalg.solve(a, b)
    return torch.cat([coeffs, torch.ones(n, 1, dtype=torch.float64)], 1).view(n, 3, 3)


def rotation_matrix(degrees: torch.Tensor, size: int) -> torch.Tensor:
    """Counter-clockwise rotation about the image centre (torchvision's sign), output -> input."""
    theta = torch.deg2rad(degrees.to(torch.float64))
    c, s = torch.cos(theta), torch.sin(theta)
    centre = size / 2
    m = torch.zeros(len(degrees), 3, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1] = c, -s
    m[:, 1, 0], m[:, 1, 1] = s, c
    m[:, 0, 2] = centre - c * centre + s * centre
    m[:, 1, 2] = centre - s * centre - c * centre
    m[:, 2, 2] = 1
    return m


def replicate_edges(images: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Fill each image's padding with its last row and column, so that interpolation taps that cross an image's
    own edge read the edge pixel, as they would at the border of an unpadded image."""
    _, _, h, w = images.shape
    if bool((heights == h).all() and (widths == w).all()):
        return images
    device = images.device
    last_row = heights.to(device, non_blocking=True) - 1
    last_col = widths.to(device, non_blocking=True) - 1
    rows = torch.minimum(torch.arange(h, device=device)[None], last_row[:, None])  # B x H
    cols = torch.minimum(torch.arange(w, device=device)[None], last_col[:, None])  # B x W
    images = images.gather(2, rows[:, None, :, None].expand(-1, images.shape[1], -1, w))
    return images.gather(3, cols[:, None, None, :].expand(-1, images.shape[1], h, -1))


def _box_bounds(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    top, left, height, width = boxes.unbind(1)
    return left, top, left + width, top + height


def warp(
    images: torch.Tensor,
    matrices: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """One resampling pass: output pixel (u, v) of sample b reads images[b] at matrices[b] @ [u+.5, v+.5, 1].

    images: float B x 1 x H x W (a padded batch whose padding `replicate_edges` filled); boxes: B x 4 int64 (top,
    left, height, width), the region each sample reads: the crop's box for the run that starts with the crop, the
    whole image for a later run. Sample points are clamped to the box (like resizing the cropped image) and points
    that perspective or rotation moves outside it get 0 (torchvision's fill). Bicubic taps next to a crop edge read
    the real neighbouring pixels, where torchvision, cropping first, repeats the edge.
    """
    b, _, h, w = images.shape
    device = images.device
    # Crop and flips only (no perspective, no rotation): x depends on u alone and y on v alone, and every point
    # stays in the box. Building that grid costs O(B x S), not O(B x S^2). The split is decided where the
    # parameters were drawn (the CPU), so it never waits for the GPU; copies to the device do not block either.
    separable = (matrices[:, 0, 1] == 0) & (matrices[:, 1, 0] == 0) & (matrices[:, 2, :2] == 0).all(1)
    flat = separable.nonzero().squeeze(1).to(device, non_blocking=True)
    warped = (~separable).nonzero().squeeze(1).to(device, non_blocking=True)
    matrices = matrices.to(device=device, dtype=torch.float32, non_blocking=True)  # exact: coordinates < ~10^4
    x0, y0, x1, y1 = (v.to(device=device, dtype=torch.float32, non_blocking=True) for v in _box_bounds(boxes))
    centres = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    grid = torch.empty(b, size, size, 2, device=device, dtype=torch.float32)
    if len(flat):
        m = matrices[flat]
        xs = m[:, 0, 0, None] * centres + m[:, 0, 2, None]  # B' x S
        ys = m[:, 1, 1, None] * centres + m[:, 1, 2, None]
        xs = torch.minimum(torch.maximum(xs, x0[flat, None] + 0.5), x1[flat, None] - 0.5).mul_(2 / w).sub_(1)
        ys = torch.minimum(torch.maximum(ys, y0[flat, None] + 0.5), y1[flat, None] - 0.5).mul_(2 / h).sub_(1)
        grid[flat, :, :, 0] = xs[:, None, :].expand(-1, size, -1)
        grid[flat, :, :, 1] = ys[:, :, None].expand(-1, -1, size)
    inside = None
    if len(warped):
        m = matrices[warped]
        u, v = centres[None, None, :], centres[None, :, None]

        def row(k):  # m[:, k] . (u, v, 1) over the S x S grid
            return m[:, k, 0, None, None] * u + m[:, k, 1, None, None] * v + m[:, k, 2, None, None]

        denominator = row(2)
        x, y = row(0).div_(denominator), row(1).div_(denominator)
        bx0, by0 = x0[warped, None, None], y0[warped, None, None]
        bx1, by1 = x1[warped, None, None], y1[warped, None, None]
        inside = (x >= bx0) & (x <= bx1) & (y >= by0) & (y <= by1)
        grid[warped, :, :, 0] = torch.minimum(torch.maximum(x, bx0 + 0.5), bx1 - 0.5).mul_(2 / w).sub_(1)
        grid[warped, :, :, 1] = torch.minimum(torch.maximum(y, by0 + 0.5), by1 - 0.5).mul_(2 / h).sub_(1)
    out = F.grid_sample(images, grid.to(images.dtype), mode=interpolation, padding_mode="border", align_corners=False)
    if inside is not None:
        out[warped] *= inside[:, None].to(out.dtype)
    return out
