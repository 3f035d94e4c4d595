"""Two-view pairs per second for each loader backend, against the study's pipeline, over the same images.

    python bench/pipeline.py --data data/demo/packed --device cpu --backends native,baseline --json out.json
    python bench/pipeline.py --data data/demo/packed --backends native,baseline --caches none,host

`--caches` gives the native backend one row per cache mode (pipelines/cache.py): `native` decodes every batch,
`native-host` and `native-device` gather from the split decoded once. That one decode (`fill_s`) is timed apart and
not counted in pairs/s; on the CPU host and device are one path.

`baseline` is the study's way: a Dataset that opens PNG files with PIL and runs torchvision transforms on each
image for both views, in a DataLoader with every core as a worker. The PNGs are the packed images written out once.
Each backend runs `--warmup` batches, then is timed over `--batches` batches (CUDA is synchronised before the clock
stops). The JSON goes to bench/results/pipeline-<device>.json, and to --json too when given.

With a URL as `--data` (`s3://...`, with `--storage-options` for its endpoint), it times whole epochs instead: the
first from an empty shard cache (cold), the later ones from the filled cache (warm), beside the same files in a
local directory (bench/remote_epochs.py); the JSON goes to bench/results/pipeline-remote-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import date
from functools import partial
from pathlib import Path

import cv2
import torch
from PIL import Image
from torchvision.transforms import v2

from twinray.bench import remote_epochs
from twinray.bench.report import (
    device_name,
    time_calls,
)
from twinray.bench.report import save as report_save
from twinray.cli import OneLineParser, run_cli
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import load_recipe
from twinray.pipelines.augment.reference import StudyNoise
from twinray.pipelines.cache import CACHES
from twinray.prep.format import PackedDataset
from twinray.prep.open_dataset import open_dataset
from twinray.storage import is_url, location, storage_options_type


def study_transform(recipe) -> v2.Compose:
    """The recipe as the study wrote it: torchvision transforms on one PIL image at a time."""
    r = recipe
    mode = v2.InterpolationMode.BICUBIC if r.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    ops = [
        v2.RandomResizedCrop(r.size, scale=r.crop_scale, ratio=r.crop_ratio, interpolation=mode),
        v2.RandomHorizontalFlip(r.hflip),
        v2.RandomVerticalFlip(r.vflip),
        v2.RandomEqualize(r.equalize),
    ]
    if r.brightness_contrast:
        ops.append(
            v2.RandomApply([v2.ColorJitter(brightness=r.brightness, contrast=r.contrast)], r.brightness_contrast)
        )
    ops += [
        v2.RandomApply([v2.GaussianBlur(r.blur_kernel, r.blur_sigma)], r.blur),
        v2.RandomPerspective(r.perspective_distortion, r.perspective),
        v2.RandomRotation(r.rotation_degrees) if r.rotation else v2.Identity(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([StudyNoise(*r.noise_mean_fraction)], r.noise),
    ]
    return v2.Compose(ops)


class PngPairs(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as image:
            image = image.convert("L")
            return self.transform(image), self.transform(image)


def export_pngs(data: PackedDataset, rows, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in rows:
        path = folder / f"{int(i)}.png"
        cv2.imwrite(str(path), data.image(int(i)))
        files.append(path)
    return files


def cycle(loader):
    while True:
        yield from loader


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=location, required=True, help="a packed dataset: a directory or a URL")
    parser.add_argument("--storage-options", type=storage_options_type, default=None, help="fsspec options (JSON)")
    parser.add_argument("--epochs", type=int, default=4, help="a URL's epochs: 1 cold, then warm and local (4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="native,baseline")
    parser.add_argument(
        "--caches", default="none", help="the native backend's cache modes, a row each: none,host,device"
    )
    parser.add_argument("--recipe", default="seed-final")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the JSON here (it always goes to bench/results/)"
    )
    args = parser.parse_args()
    caches = args.caches.split(",")
    unknown = [c for c in caches if c not in CACHES]
    if unknown:
        parser.error(f"--caches {','.join(unknown)}: each is one of {', '.join(CACHES)}")

    device = torch.device(args.device)
    recipe = load_recipe(args.recipe).at_size(args.size)  # as the loaders use it
    if is_url(args.data):
        remote(args, device, recipe)
        return
    data = open_dataset(args.data)
    cores = len(os.sched_getaffinity(0))
    results = {}
    report = {
        "benchmark": "pipeline",
        "date": date.today().isoformat(),
        "device": device_name(device) + ("" if device.type == "cuda" else f" ({cores} cores)"),
        "data": str(args.data),
        "images": len(data.indices("train")),
        "recipe": recipe.name,
        "size": args.size,
        "batch_size": args.batch_size,
        "encoding": data.encoding,
        "results": results,
    }
    if report["images"] < args.batch_size:  # every epoch would be empty, and cycling them would never return
        parser.error(f"--batch-size {args.batch_size} is larger than the train split ({report['images']} images)")
    # The baseline first: its workers fork before any loader has started a thread (forking beside a busy thread
    # can leave a child holding a lock forever).
    backends = sorted(args.backends.split(","), key=lambda b: b != "baseline")
    # (row name, backend, cache): the native backend once per cache mode
    rows = [
        (backend if cache == "none" else f"{backend}-{cache}", backend, cache)
        for backend in backends
        for cache in (caches if backend == "native" else ["none"])
    ]
    for k, (name, backend, cache) in enumerate(rows):
        extra = {}
        if backend == "baseline":
            work = Path(tempfile.mkdtemp(prefix="twinray-bench-pipeline-"))
            files = export_pngs(data, data.indices("train"), work)
            loader = torch.utils.data.DataLoader(
                PngPairs(files, study_transform(recipe)),
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=cores,
                drop_last=True,
                persistent_workers=True,
            )
            batches = cycle(loader)
            seconds = time_calls(partial(next, batches), args.warmup, args.batches, device)
            batches.close()
            del batches, loader  # the last reference: its workers are shut down here, not at exit
            shutil.rmtree(work, ignore_errors=True)
        else:
            # Closed before the next backend starts: its threads and pipelines end here (pipelines.loader).
            with build_loader(
                str(args.data),
                LoaderSettings(batch_size=args.batch_size, device=device, recipe=recipe, size=args.size),
                backend=backend,
                cache=cache,
            ) as loader:
                if cache != "none":  # the one decode of the split, timed apart
                    start = time.perf_counter()
                    loader.fill_cache()
                    extra = {"cache": loader.cache_mode, "fill_s": round(time.perf_counter() - start, 3)}
                seconds = time_calls(partial(next, cycle(loader)), args.warmup, args.batches, device)
        pairs = args.batches * args.batch_size
        results[name] = {
            "pairs_per_s": round(pairs / seconds, 1),
            "seconds": round(seconds, 3),
            "pairs": pairs,
            **extra,
        }
        fill = f"; the cache filled in {extra['fill_s']:.2f} s" if extra else ""
        print(f"{name:<14} {pairs / seconds:>10.1f} pairs/s  ({pairs} pairs in {seconds:.2f} s{fill})")
        if "baseline" in results:
            for row in results.values():
                row["vs_baseline"] = round(row["pairs_per_s"] / results["baseline"]["pairs_per_s"], 2)
        # Saved after each backend, so a run cut short keeps what it measured.
        report_save(report, f"pipeline-{device.type}", args.json, quiet=k < len(rows) - 1)


def remote(args, device, recipe) -> None:
    """A URL's cold, warm and local epochs per backend (bench/remote_epochs.py)."""
    if args.epochs < 2:
        raise SystemExit("pipeline: --epochs must be at least 2 for a URL (1 cold, then warm)")
    backends = [b for b in args.backends.split(",") if b != "baseline"]
    settings = LoaderSettings(batch_size=args.batch_size, recipe=recipe, size=args.size)
    results = remote_epochs.run(args.data, backends, args.epochs, settings, device, args.storage_options)
    report = {
        "benchmark": "pipeline-remote",
        "date": date.today().isoformat(),
        "device": device_name(device) + ("" if device.type == "cuda" else f" ({len(os.sched_getaffinity(0))} cores)"),
        "data": args.data,
        "recipe": recipe.name,
        "size": args.size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "results": results,
    }
    report_save(report, f"pipeline-remote-{device.type}", args.json)


if __name__ == "__main__":
    run_cli(main, "pipeline")
