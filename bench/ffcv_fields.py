"""How to store grey X-rays for FFCV, measured: the ffcv backend's raw grey NDArrayField against RGBImageField,
whose images must have 3 channels (the grey image repeated, one channel taken back on load).

    python bench/ffcv_fields.py --data data/demo/packed --json out.json

For the train split, each layout is written once, then read through FFCV's Loader on the CPU (decode, to tensor,
one channel), after warm-up. Reported per layout: file size, write seconds, images/s read, and the mean absolute
pixel error against the packed images (RGBImageField's JPEG is a second lossy generation). The JSON goes to
bench/results/ffcv-fields-cpu.json, and to --json too when given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from twinray.bench.report import device_name
from twinray.bench.report import save as report_save
from twinray.cli import OneLineParser, run_cli
from twinray.prep.ffcv_pack import require_ffcv, torch_threads_kept, write_beton
from twinray.prep.format import PackedDataset
from twinray.prep.open_dataset import open_dataset

PASSES = 7  # a pass over a small split takes milliseconds: one pass is noise


class _RepeatedGrey(Dataset):
    """(H x W x 3 uint8, row) per train image: what RGBImageField accepts."""

    def __init__(self, root: Path, rows: np.ndarray):
        self.root, self.rows, self.data = root, rows, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        if self.data is None:  # opened in the writer's process
            self.data = open_dataset(self.root)
        grey = self.data.image(int(self.rows[k]))
        return np.repeat(grey[:, :, None], 3, axis=2), int(self.rows[k])


def write_rgb(data: PackedDataset, rows: np.ndarray, path: Path, mode: str) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=90), "row": IntField()}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(_RepeatedGrey(data.root, rows))


def read_all(path: Path, image_decoder, batch_size: int, workers: int, rgb: bool, skip=()) -> tuple[float, list]:
    """Images/s, the median over PASSES timed passes (after a warm-up pass, which also compiles FFCV's
    pipeline), and the images of the last pass with their rows."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    with torch_threads_kept():
        loader = Loader(
            str(path),
            batch_size=batch_size,
            num_workers=workers,
            order=OrderOption.SEQUENTIAL,
            pipelines={
                "image": [image_decoder, ToTensor()],
                "row": [IntDecoder(), ToTensor()],
                **dict.fromkeys(skip),  # fields left undecoded
            },
        )
    rates, seen = [], []
    for _ in range(1 + PASSES):
        start, seen = time.perf_counter(), []
        with torch_threads_kept():
            for images, rows in loader:
                grey = images[..., 0] if rgb else images  # one channel back
                seen.append((grey.clone(), rows.reshape(-1).clone()))
        rates.append(sum(len(r) for _, r in seen) / (time.perf_counter() - start))
    return float(np.median(rates[1:])), seen


def pixel_error(data: PackedDataset, seen: list) -> float:
    errors = []
    for images, rows in seen:
        for image, row in zip(images, rows):
            original = data.image(int(row))
            decoded = image[: original.shape[0], : original.shape[1]].numpy()
            errors.append(np.abs(decoded.astype(np.int16) - original.astype(np.int16)).mean())
    return float(np.mean(errors))


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a packed dataset with one image size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    require_ffcv()
    from ffcv.fields.decoders import NDArrayDecoder, SimpleRGBImageDecoder

    data = open_dataset(args.data)
    rows = data.indices("train")
    sizes = {(int(data.index["height"][i]), int(data.index["width"][i])) for i in rows}
    if len(sizes) != 1:
        sys.exit(f"ffcv_fields: {args.data} holds images of {len(sizes)} sizes; SimpleRGBImageDecoder needs one")
    workers = len(os.sched_getaffinity(0))
    results = {}
    with tempfile.TemporaryDirectory(prefix="twinray-ffcv-fields-") as work:
        layouts = {
            "grey-ndarray (the ffcv backend's)": (lambda p: write_beton(args.data, "train", p), NDArrayDecoder, False),
            "rgb-jpg (q90)": (lambda p: write_rgb(data, rows, p, "jpg"), SimpleRGBImageDecoder, True),
            "rgb-raw": (lambda p: write_rgb(data, rows, p, "raw"), SimpleRGBImageDecoder, True),
        }
        for name, (write, decoder, rgb) in layouts.items():
            path = Path(work) / f"{len(results)}.beton"
            start = time.perf_counter()
            with torch_threads_kept():
                write(path)
            written = time.perf_counter() - start
            skip = () if rgb else ("size", "label")  # the backend's beton holds these too; the others do not
            per_s, seen = read_all(path, decoder(), args.batch_size, workers, rgb, skip)
            results[name] = {
                "megabytes": round(path.stat().st_size / 2**20, 2),
                "write_seconds": round(written, 2),
                "images_per_s_read": round(per_s, 1),
                "images_read": sum(len(r) for _, r in seen),  # one whole pass: every image, each counted once
                "mean_abs_pixel_error": round(pixel_error(data, seen), 3),
            }
            print(f"{name:<36} {results[name]}")
    report = {
        "benchmark": "ffcv_fields",
        "date": date.today().isoformat(),
        "device": f"{device_name(torch.device('cpu'))} ({workers} cores)",
        "data": str(args.data),
        "images": len(rows),
        "image_size": list(sizes.pop()),
        "batch_size": args.batch_size,
        "results": results,
    }
    report_save(report, "ffcv-fields-cpu", args.json)


if __name__ == "__main__":
    run_cli(main, "ffcv_fields")
