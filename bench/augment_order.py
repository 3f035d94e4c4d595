"""How far each way of ordering the augmentation lands from the study's list, on real radiographs, and what it costs.

    python bench/augment_order.py --views 2 --images 96 --json out.json

Every variant gets the same parameters (`Augment.sample`, recipe seed-final at 224 px, noise off since its pixels are
random) and is compared view by view with the study's list in torchvision (`augment.reference.study_functional`):
- `study order` (twinray's spec): crop and flips resampled once; equalize, blur; perspective resampled once.
- `fused, equalize over the view` (twinray before the spec): crop, flips and perspective in one resampling with the
  crop's filter (bicubic), then equalize (its histogram holding the perspective's black fill) and blur.
- `fused, equalize over the image's pixels`: the same, but equalize's histogram and mapping leave the fill out.
- `dali`: the DALI walker on its CPU pipeline (its declared deviations included).
Figures on the 0-255 scale: mean absolute error, its 99th percentile, the mean absolute difference of per-view means
and standard deviations, and the mean total variation distance between 32-bin histograms; over all views and over
the views where equalize and perspective both apply (where order matters). Native timings: median of `--repeats`
batches of `--batch` views on this machine's CPU. JSON goes to bench/results/augment-order-cpu.json and --json.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from twinray.atomic import write_json
from twinray.cli import OneLineParser, run_cli
from twinray.pipelines.augment import Augment, geometry, intensity, load_recipe
from twinray.pipelines.augment import dali as dali_augment
from twinray.pipelines.augment.ops import RUNS
from twinray.pipelines.augment.pipeline import run_matrices
from twinray.pipelines.augment.reference import study_functional
from twinray.pipelines.native import pad_batch

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-cxr"
RESULTS = Path(__file__).resolve().parent / "results"


def load_images(count: int, short_side: int = 256) -> list[torch.Tensor]:
    """Real radiographs, alternating the two sources, resized to `short_side` px on the short side (as prep packs
    them), uint8 H x W."""
    mhh = sorted((REAL / "mhh-covid19" / "png").glob("*.png"))
    nih = sorted((REAL / "nih-cxr14").glob("*/*.png"))
    files = [f for pair in zip(mhh, nih) for f in pair][:count]
    images = []
    for f in files:
        image = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        h, w = image.shape
        scale = short_side / min(h, w)
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        images.append(torch.from_numpy(image))
    return images


def opencv_equalize(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's equalizeHist, which DALI's equalize computes: uint8 1 x H x W."""
    return torch.from_numpy(cv2.equalizeHist(np.ascontiguousarray(x[0].numpy())))[None]


def masked_equalize(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """torchvision's (PIL's) equalize with the histogram and the mapping over `valid` pixels only.
    x: uint8 B x 1 x S x S; valid: bool B x 1 x S x S. Pixels outside `valid` keep their value."""
    b = x.shape[0]
    levels = x.flatten(1).long()
    hist = torch.zeros(b, 256, dtype=torch.int64).scatter_add_(1, levels, valid.flatten(1).long())
    top = 255 - torch.flip(hist > 0, [1]).int().argmax(1)  # the highest level present
    step = (hist.sum(1) - hist.gather(1, top[:, None])[:, 0]) // 255
    lut = (torch.cumsum(hist, 1) - hist + (step // 2)[:, None]) // step.clamp(min=1)[:, None]
    lut = torch.where(step[:, None] > 0, lut.clamp(max=255), torch.arange(256)[None])
    mapped = lut.gather(1, levels).view_as(x).to(torch.uint8)
    return torch.where(valid, mapped, x)


def fused(aug: Augment, images: torch.Tensor, p, masked: bool) -> torch.Tensor:
    """twinray's order before the spec: every geometric op in one resampling, then equalize and blur."""
    r = aug.recipe
    x = geometry.replicate_edges(images.float() / 255, p.sizes[:, 0], p.sizes[:, 1])
    m = run_matrices(RUNS[0], p, r) @ run_matrices(RUNS[4], p, r)  # crop @ flips @ perspective @ rotation
    x = geometry.warp(x, m, p.boxes, r.size, r.interpolation).clamp_(0, 1)
    i = p.equalize.nonzero().squeeze(1)
    levels = (x[i] * 255).round().to(torch.uint8)
    if masked:  # warping ones gives 1 where the image is and 0 where the perspective filled
        ones = torch.ones_like(images[i], dtype=torch.float32)
        valid = geometry.warp(ones, m[p.equalize], p.boxes[p.equalize], r.size, "bilinear") > 0.5
        equalized = masked_equalize(levels, valid)
    else:
        equalized = intensity.equalize(levels)
    x[i] = equalized.float() / 255
    i = p.blur.nonzero().squeeze(1)
    x[i] = intensity.gaussian_blur(x[i], p.blur_sigma[p.blur], r.blur_kernel)
    return x


def figures(ours: torch.Tensor, reference: torch.Tensor, views: torch.Tensor) -> dict:
    a, b = ours[views].flatten(1) * 255, reference[views].flatten(1) * 255
    error = (a - b).abs()

    def hist(v):
        h = torch.stack([torch.histc(row, 32, 0, 255.001) for row in v])
        return h / h.sum(1, keepdim=True)

    return {
        "views": int(views.sum()),
        "mean_abs_error": round(error.mean().item(), 3),
        "p99_abs_error": round(torch.quantile(error.flatten()[::7], 0.99).item(), 2),
        "abs_diff_of_means": round((a.mean(1) - b.mean(1)).abs().mean().item(), 3),
        "abs_diff_of_stds": round((a.std(1) - b.std(1)).abs().mean().item(), 3),
        "histogram_tv": round((0.5 * (hist(a) - hist(b)).abs().sum(1)).mean().item(), 4),
    }


def timing(aug: Augment, images: torch.Tensor, sizes: torch.Tensor, repeats: int) -> dict:
    out = {}
    for name, run in (
        ("study order", lambda p: aug.apply(images, p)),
        ("fused, equalize over the view", lambda p: fused(aug, images, p, masked=False)),
        ("fused, equalize over the image's pixels", lambda p: fused(aug, images, p, masked=True)),
    ):
        seconds = []
        for _ in range(repeats):
            p = aug.sample(sizes[:, 0], sizes[:, 1])
            start = time.perf_counter()
            run(p)
            seconds.append(time.perf_counter() - start)
        out[name] = round(statistics.median(seconds) * 1000, 1)
    return out


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    recipe = load_recipe("seed-final", noise=0.0)
    aug = Augment(recipe, seed=0)
    raw = load_images(args.images)
    images, sizes = pad_batch(raw)
    check = images[:8, :, :64, :64].contiguous()
    assert torch.equal(masked_equalize(check, torch.ones_like(check, dtype=torch.bool)), intensity.equalize(check))
    variants: dict[str, list[torch.Tensor]] = {}
    masks = {"all": [], "equalize and perspective": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchvision's per-image kernels
    for _ in range(args.views):
        p = aug.sample(sizes[:, 0], sizes[:, 1])
        ref = torch.stack([study_functional(raw[k][None], p, k, recipe) for k in range(len(raw))])
        opencv = torch.stack([study_functional(raw[k][None], p, k, recipe, opencv_equalize) for k in range(len(raw))])
        outputs = {
            "reference": ref,
            "reference, OpenCV equalize": opencv,
            "study order": aug.apply(images, p),
            "fused, equalize over the view": fused(aug, images, p, masked=False),
            "fused, equalize over the image's pixels": fused(aug, images, p, masked=True),
            "dali": dali_augment.apply_cpu([im.numpy() for im in raw], p, recipe),
        }
        for name, out in outputs.items():
            variants.setdefault(name, []).append(out.float())
        masks["all"].append(torch.ones(len(raw), dtype=torch.bool))
        masks["equalize and perspective"].append(p.equalize & p.perspective)
    torch.set_num_threads(threads)
    outputs = {name: torch.cat(v) for name, v in variants.items()}
    masks = {name: torch.cat(m) for name, m in masks.items()}
    compared = {}
    for name in ("study order", "fused, equalize over the view", "fused, equalize over the image's pixels", "dali"):
        compared[name] = {subset: figures(outputs[name], outputs["reference"], m) for subset, m in masks.items()}
    compared["dali against the reference with OpenCV's equalize"] = {
        subset: figures(outputs["dali"], outputs["reference, OpenCV equalize"], m) for subset, m in masks.items()
    }
    batch, batch_sizes = images[: args.batch], sizes[: args.batch]
    result = {
        "recipe": "seed-final, 224 px, noise off",
        "images": f"{len(raw)} real radiographs (mhh-covid19 and nih-cxr14 alternating), 256 px short side",
        "views_per_image": args.views,
        "dali_deviations": dali_augment.deviations(recipe),
        "against_the_study_list": compared,
        "native_ms_per_batch": {"batch": len(batch), "threads": torch.get_num_threads()}
        | timing(aug, batch, batch_sizes, args.repeats),
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "augment-order-cpu.json", result)
    if args.json:
        write_json(args.json, result)
    for name, subsets in compared.items():
        for subset, f in subsets.items():
            print(f"{name:52s} {subset:26s} {f}")
    print(result["native_ms_per_batch"])


if __name__ == "__main__":
    run_cli(main, "augment_order")
