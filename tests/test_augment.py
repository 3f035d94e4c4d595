"""Augmentation parity with torchvision.transforms.v2.functional, parameter statistics, and determinism.

Tolerances (on the 0-255 scale):
- equalize: exact. Flips: exact after rounding to uint8.
- resized crop, bilinear: max 0.01. Bicubic: max 0.01 away from the crop edges and mean 0.5 over the image (taps
  next to a crop edge read the real neighbouring pixels where torchvision, cropping first, repeats the edge pixel).
- perspective and rotation, bilinear: mean 0.5 and 99th percentile 2, except a band of one pixel along the border of
  the valid region (torchvision blends with the zero fill there, we cut).
- blur and brightness/contrast: max 1e-3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from twinray.pipelines.augment import RECIPES, Augment, Recipe, equalize, gaussian_blur, geometry, load_recipe
from twinray.pipelines.augment.recipes import SEED_FINAL, STUDY_RECIPES

S = 64


def _images(b=4, h=S, w=S, seed=0) -> torch.Tensor:
    """Smooth random images (so interpolation differences stay small), uint8 B x 1 x H x W."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, h // 8 + 1, w // 8 + 1, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def _identity_params(aug: Augment, b: int, size: int, height: int | None = None, width: int | None = None):
    """Params with every op off and the crop covering the whole image (S x S unless given)."""
    height, width = height or size, width or size
    p = aug.sample(torch.full((b,), height), torch.full((b,), width))
    p.boxes = torch.tensor([[0, 0, height, width]] * b)
    for flag in ("hflip", "vflip", "perspective", "rotation", "equalize", "brightness_contrast", "blur", "noise"):
        setattr(p, flag, torch.zeros(b, dtype=torch.bool))
    return p


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * 255).round().to(torch.uint8)


def test_equalize_equals_torchvision_exactly():
    x = _images(6, 40, 50)
    x[1] = 7  # a constant image: torchvision leaves it alone
    x[2, :, :20] = 0  # two-level image
    x[2, :, 20:] = 200
    x[3] = (x[3] // 64) * 64  # few levels
    out = equalize(x)
    assert out.dtype == torch.uint8
    assert torch.equal(out, TF.equalize(x))
    assert torch.equal(out[1], x[1])
    with pytest.raises(ValueError, match="uint8"):
        equalize(x.float())


@pytest.mark.parametrize("which", ["hflip", "vflip"])
def test_flips_equal_torchvision_exactly(which):
    aug = Augment(Recipe(size=S, interpolation="bilinear"))
    x = _images()
    p = _identity_params(aug, 4, S)
    getattr(p, which)[:] = True
    out = aug.apply(x, p)
    expected = TF.horizontal_flip(x) if which == "hflip" else TF.vertical_flip(x)
    assert torch.equal(_u8(out), expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resized_crop_matches_torchvision(interpolation):
    aug = Augment(Recipe(size=S, interpolation=interpolation), seed=3)
    x = _images(8, 90, 120, seed=1)
    p = _identity_params(aug, 8, S, 90, 120)
    top, left, h, w = geometry.sample_crops(
        torch.full((8,), 90), torch.full((8,), 120), (0.08, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(5)
    )
    p.boxes = torch.stack([top, left, h, w], 1)
    out = aug.apply(x, p) * 255
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    for k in range(8):
        ref = TF.resized_crop(
            x[k].float(), int(top[k]), int(left[k]), int(h[k]), int(w[k]), [S, S], interpolation=mode, antialias=False
        ).clamp(0, 255)
        diff = (out[k, 0] - ref[0]).abs()
        if interpolation == "bilinear":
            assert diff.max() <= 0.01, (k, diff.max())
            continue
        # Bicubic reads 2 source pixels either side: away from the crop edges the kernels agree exactly.
        band_y, band_x = math.ceil(2 * S / int(h[k])) + 1, math.ceil(2 * S / int(w[k])) + 1
        assert diff[band_y:-band_y, band_x:-band_x].max() <= 0.01, (k, diff.max())
        assert diff.mean() <= 0.5, (k, diff.mean())


def _interior(mask_valid: torch.Tensor) -> torch.Tensor:
    """Valid pixels at least one pixel away from the invalid region."""
    eroded = -torch.nn.functional.max_pool2d(-mask_valid.float()[:, None], 3, stride=1, padding=1)
    return eroded[:, 0] > 0.5


def test_perspective_matches_torchvision():
    aug = Augment(Recipe(size=S, interpolation="bilinear", perspective=1.0, perspective_distortion=0.5), seed=7)
    x = _images(6)
    p = _identity_params(aug, 6, S)
    p.perspective[:] = True
    out = aug.apply(x, p)[:, 0] * 255
    for k in range(6):
        ref = TF.perspective(
            x[k].float(),
            p.start_points[k].tolist(),
            p.end_points[k].tolist(),
            interpolation=InterpolationMode.BILINEAR,
            fill=0,
        )[0]
        ones = TF.perspective(
            torch.ones(1, S, S),
            p.start_points[k].tolist(),
            p.end_points[k].tolist(),
            interpolation=InterpolationMode.BILINEAR,
            fill=0,
        )[0]
        keep = _interior(ones[None] > 0.999)[0]
        diff = (out[k] - ref)[keep].abs()
        assert diff.mean() < 0.5 and torch.quantile(diff, 0.99) < 2, (k, diff.mean(), diff.max())
        assert keep.float().mean() > 0.3


def test_rotation_matches_torchvision_sign_and_values():
    aug = Augment(Recipe(size=S, interpolation="bilinear", rotation=1.0, rotation_degrees=30), seed=2)
    x = _images(4)
    p = _identity_params(aug, 4, S)
    p.rotation[:] = True
    p.angles = torch.tensor([25.0, -25.0, 10.0, -3.0], dtype=torch.float64)
    out = aug.apply(x, p)[:, 0] * 255
    for k in range(4):
        angle = float(p.angles[k])
        ref = TF.rotate(x[k].float(), angle, interpolation=InterpolationMode.BILINEAR, fill=0)[0]
        ones = TF.rotate(torch.ones(1, S, S), angle, interpolation=InterpolationMode.BILINEAR, fill=0)[0]
        keep = _interior(ones[None] > 0.999)[0]
        diff = (out[k] - ref)[keep].abs()
        assert diff.mean() < 0.5 and torch.quantile(diff, 0.99) < 2, (k, diff.mean(), diff.max())


def test_blur_matches_torchvision_per_sample_sigma():
    x = _images(3).float() / 255
    sigmas = torch.tensor([0.3, 1.0, 2.0])
    out = gaussian_blur(x, sigmas, 23)
    for k in range(3):
        ref = TF.gaussian_blur(x[k], [23, 23], [float(sigmas[k])] * 2)
        assert (out[k] - ref).abs().max() * 255 < 1e-3


def test_brightness_contrast_match_torchvision():
    aug = Augment(Recipe(size=S, interpolation="bilinear", brightness_contrast=1.0), seed=4)
    x = _images(5)
    p = _identity_params(aug, 5, S)
    p.brightness_contrast[:] = True
    out = aug.apply(x, p)
    for k in range(5):
        ref = TF.adjust_contrast(TF.adjust_brightness(x[k].float() / 255, float(p.brightness[k])), float(p.contrast[k]))
        assert (out[k] - ref).abs().max() * 255 < 1e-3


def test_noise_sigma_is_image_mean_times_factor():
    aug = Augment(Recipe(size=S, interpolation="bilinear", noise=1.0, noise_mean_fraction=(0.06, 0.1)), seed=9)
    x = torch.full((8, 1, S, S), 100, dtype=torch.uint8)
    p = _identity_params(aug, 8, S)
    p.noise[:] = True
    out = aug.apply(x, p)
    measured = (out - 100 / 255).flatten(1).std(1)
    expected = (100 / 255) * p.noise_sigma_factor.float()
    assert torch.allclose(measured, expected, rtol=0.05)
    assert ((p.noise_sigma_factor >= 0.06) & (p.noise_sigma_factor <= 0.1)).all()


def test_probabilities_and_ranges_are_honoured():
    recipe = load_recipe(SEED_FINAL).replace(rotation=0.3)
    aug = Augment(recipe, seed=0)
    n = 20000
    heights, widths = torch.full((n,), 256), torch.randint(256, 400, (n,))
    p = aug.sample(heights, widths)
    tolerance = 4 * math.sqrt(0.25 / n)
    for flag, prob in [
        ("hflip", 0.5),
        ("vflip", 0.5),
        ("equalize", 0.5),
        ("perspective", 0.5),
        ("blur", 0.5),
        ("noise", 0.5),
        ("rotation", 0.3),
        ("brightness_contrast", 0.0),
    ]:
        assert abs(getattr(p, flag).float().mean().item() - prob) < tolerance + 1e-9, flag
    top, left, h, w = p.boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    area = (h * w).double() / (heights * widths).double()
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    ratio = w.double() / h.double()
    assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 * 1.1
    # The same distribution as torchvision's RandomResizedCrop on one image size.
    torch.manual_seed(0)
    ours = geometry.sample_crops(
        torch.full((4000,), 256), torch.full((4000,), 300), (0.08, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(1)
    )
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(torch.empty(1, 256, 300), [0.08, 1.0], [0.75, 4 / 3]) for _ in range(4000)]
    )
    for column in (2, 3):  # height, width
        a, b = ours[column].double(), theirs[:, column].double()
        for q in (0.1, 0.5, 0.9):
            assert abs(torch.quantile(a, q) - torch.quantile(b, q)) < 0.05 * 256, (column, q)
    assert p.blur_sigma.min() >= 0.1 and p.blur_sigma.max() <= 2.0
    assert p.angles.abs().max() <= 20.0
    d = int(0.15 * (224 // 2))
    ends = p.end_points
    assert ends[:, 0].min() >= 0 and ends[:, 0].max() <= d  # top-left corner moves inward at most d
    assert ends[:, 2].min() >= 224 - d - 1 and ends[:, 2].max() <= 223


def test_crops_stay_inside_each_image_of_a_padded_batch():
    # Two images of different sizes, padded with white: no output pixel may come from the padding.
    recipe = Recipe(size=32, interpolation="bicubic", hflip=0.5, vflip=0.5)
    aug = Augment(recipe, seed=1)
    batch = torch.full((2, 1, 80, 100), 255, dtype=torch.uint8)
    batch[0, :, :50, :70] = 10
    batch[1, :, :80, :60] = 10
    sizes = torch.tensor([[50, 70], [80, 60]])
    for _ in range(20):
        out = aug(batch, sizes)
        assert torch.allclose(out, torch.full_like(out, 10 / 255), atol=1e-5)


def test_output_shape_dtype_layout_and_normalisation():
    x = _images(3, 70, 90)
    out = Augment("seed-final", dtype=torch.bfloat16)(x)
    assert out.shape == (3, 1, 224, 224) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert 0 <= out.min() and out.max() <= 1
    normed = Augment(load_recipe("base", normalize=(0.5, 0.25), size=32))(x)
    assert normed.min() < 0 and normed.max() > 1
    float_in = Augment(load_recipe("base", size=32), seed=5)(x.float() / 255)
    uint8_in = Augment(load_recipe("base", size=32), seed=5)(x)
    assert torch.allclose(float_in, uint8_in, atol=1e-6)


def test_same_seed_same_views_other_seed_other_views():
    x = _images(4, 80, 80)
    a = Augment("seed-final", seed=11)(x)
    b = Augment("seed-final", seed=11)(x)
    c = Augment("seed-final", seed=12)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    aug = Augment("seed-final", seed=11)
    assert not torch.equal(aug(x), aug(x))  # two calls: two different views


@pytest.mark.gpu
def test_cuda_gives_the_same_views_as_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = _images(8, 120, 100)
    recipe = load_recipe(SEED_FINAL).replace(noise=0.0)  # noise streams differ between devices
    cpu = Augment(recipe, device="cpu", seed=3)(x)
    gpu = Augment(recipe, device="cuda", seed=3)(x.cuda())
    assert (cpu - gpu.cpu()).abs().mean() < 1e-3


@pytest.mark.gpu
def test_cuda_kernels_equal_torchvision_and_keep_the_output_contract():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = _images(6, 40, 50).cuda()
    x[1] = 7
    assert torch.equal(equalize(x), TF.equalize(x))
    assert torch.equal(equalize(x).cpu(), TF.equalize(x.cpu()))
    out = Augment("seed-final", device="cuda", dtype=torch.bfloat16)(_images(3, 70, 90).cuda())
    assert out.is_cuda and out.shape == (3, 1, 224, 224) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last) and 0 <= out.min() and out.max() <= 1


def test_named_recipes_cover_the_study():
    assert set(STUDY_RECIPES) <= set(RECIPES)
    final = RECIPES["seed-final"]
    assert (final.size, final.interpolation, final.crop_scale) == (224, "bicubic", (0.08, 1.0))
    for op in ("hflip", "vflip", "equalize", "perspective", "blur", "noise"):
        assert getattr(final, op) == 0.5, op
    assert final.rotation == 0 and final.brightness_contrast == 0 and final.normalize is None
    assert (final.blur_sigma, final.perspective_distortion, final.noise_mean_fraction) == (
        (0.1, 2.0),
        0.15,
        (0.06, 0.1),
    )
    base = RECIPES["base"]
    assert base.hflip == 0.5 and base.vflip == 0 and base.equalize == 0
    assert load_recipe("base+rotation").rotation == 0.5 and load_recipe("base+rotation").rotation_degrees == 20


def test_recipes_from_yaml_and_bad_values(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: seed-final\nsize: 128\nrotation: 0.25\nblur_sigma: [0.2, 1.0]\n")
    mine = load_recipe(path)
    assert (mine.name, mine.size, mine.rotation, mine.blur_sigma, mine.vflip) == ("mine", 128, 0.25, (0.2, 1.0), 0.5)
    with pytest.raises(ValueError, match="unknown recipe 'base\\+sharpen'"):
        load_recipe("base+sharpen")
    (tmp_path / "bad.yaml").write_text("hflip: 1.5\n")
    with pytest.raises(ValueError, match="hflip=1.5 is not a probability"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("hfilp: 0.5\n")
    with pytest.raises(ValueError, match="unknown recipe field.*hfilp"):
        load_recipe(tmp_path / "typo.yaml")


def test_real_radiograph_views_look_like_the_input():
    from PIL import Image

    from tests.layouts import REAL_CXR

    image = np.array(Image.open(REAL_CXR / "mhh-covid19" / "png" / "006f3a8a.png").convert("L"))
    x = torch.from_numpy(image)[None, None]
    views = Augment(load_recipe("base", size=128), seed=0)(x.expand(16, -1, -1, -1))
    # A crop of the same radiograph: the mean stays near the image's range, and views differ from each other.
    assert views.std(dim=0).mean() > 0.05
    assert abs(views.mean().item() - image.mean() / 255) < 0.15


@pytest.mark.gpu
def test_cuda_augmentation_never_waits_for_the_gpu():
    """Parameters are drawn on the CPU and copied without blocking, so a batch of any recipe queues its kernels
    without one host-device sync (a sync would stall the loader's stream on every op)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = _images(16, 120, 100).cuda()
    sizes = torch.tensor([[120, 100]] * 8 + [[90, 80]] * 8)  # padded batch: replicate_edges runs too
    every_op = load_recipe(SEED_FINAL).replace(rotation=0.5, brightness_contrast=0.5)
    augment = Augment(every_op, device="cuda", seed=0)
    augment(x, sizes)  # warm-up: first-call allocations and kernel loads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment(x, sizes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (16, 1, 224, 224) and torch.isfinite(out).all()


def test_recipes_follow_the_spec():
    """The recipe's probabilities, its name tokens and its filters come from the one spec of ops."""
    from twinray.pipelines.augment.ops import PROBABILITIES
    from twinray.pipelines.augment.recipes import TOKENS

    assert PROBABILITIES == (
        "hflip",
        "vflip",
        "equalize",
        "brightness_contrast",
        "blur",
        "perspective",
        "rotation",
        "noise",
    )
    assert TOKENS["brightness-contrast"] == "brightness_contrast" and set(TOKENS.values()) == set(PROBABILITIES)
    final = RECIPES["seed-final"]
    assert (final.interpolation, final.warp_interpolation) == ("bicubic", "bilinear")  # the study's two filters
    with pytest.raises(ValueError, match="warp_interpolation='nearest' is not bilinear or bicubic"):
        Recipe(warp_interpolation="nearest")


def test_params_name_every_op_and_refuse_unknown_names():
    aug = Augment(load_recipe(SEED_FINAL, size=32), seed=0)
    p = aug.sample(torch.tensor([40, 50]), torch.tensor([60, 30]))
    assert torch.equal(p.sizes, torch.tensor([[40, 60], [50, 30]]))
    assert p.boxes.shape == (2, 4) and p.start_points.shape == (2, 4, 2) and p.angles.shape == (2,)
    assert p.hflip.dtype == torch.bool and isinstance(p.noise_seed, int)
    with pytest.raises(AttributeError, match="Params has no 'hfilp'"):
        p.hfilp = torch.ones(2, dtype=torch.bool)
    with pytest.raises(AttributeError, match="Params has no 'angle'"):
        _ = p.angle
