"""Barlow Twins training steps/s and images/s: the study's setting against twinray's, compute ceiling and end to end.

    python bench/train_speed.py --device cuda --data data/demo/packed --json out.json
    python bench/train_speed.py --device cpu --size 64 --batch-sizes 32 --steps 5 --data data/demo/packed

Configurations, each adding one thing to the one before:
    a  the study's: eager, fp32, NCHW (end to end with the study's per-image DataLoader)
    b  a + channels_last
    c  b + bf16 autocast
    d  c + torch.compile
Each runs on synthetic batches kept on the device (the compute ceiling), and end to end with every loader backend
given in --backends (a uses the baseline loader). Images/s counts images, not pairs (two views each). The JSON goes to
bench/results/train_speed-<device>.json, and to --json too when given.
"""

from __future__ import annotations

import argparse
import itertools
import os
from datetime import date
from pathlib import Path

import torch
from twinray.bench.pipeline import PngPairs, cycle, export_pngs, study_transform
from twinray.bench.report import (
    device_name,
    time_calls,
)
from twinray.bench.report import save as report_save
from twinray.pipelines import build_loader
from twinray.pipelines.augment import load_recipe
from twinray.prep.format import PackedDataset
from twinray.train.loss import barlow_twins_loss
from twinray.train.model import BarlowTwins

COVID_IMAGES = 21_165
CONFIGS = {
    "a": dict(channels_last=False, bf16=False, compile=False),
    "b": dict(channels_last=True, bf16=False, compile=False),
    "c": dict(channels_last=True, bf16=True, compile=False),
    "d": dict(channels_last=True, bf16=True, compile=True),
}


def make_step(device: torch.device, channels_last: bool, bf16: bool, compile: bool):
    model = BarlowTwins("resnet18", 1, "512").to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-5)
    forward = torch.compile(model) if compile else model
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def step(v1: torch.Tensor, v2: torch.Tensor) -> None:
        v1, v2 = v1.contiguous(memory_format=layout), v2.contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, z1 = forward(v1)
            _, z2 = forward(v2)
        loss, _ = barlow_twins_loss(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step, batches, warmup: int, steps: int, device) -> float:
    """Seconds for `steps` training steps, each on the next pair of views."""
    return time_calls(lambda: step(*next(batches)), warmup, steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, default=None, help="a packed dataset for the end-to-end runs")
    parser.add_argument("--backends", default="native,dali,ffcv")
    parser.add_argument("--configs", default="a,b,c,d")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="128,256")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    recipe = load_recipe("seed-final", size=args.size)
    rows = []

    def record(config: str, batch: int, source: str, seconds: float) -> None:
        row = {
            "config": config,
            "batch_size": batch,
            "source": source,
            "steps_per_s": round(args.steps / seconds, 3),
            "images_per_s": round(args.steps * batch / seconds, 1),
        }
        rows.append(row)
        write_report()
        print(
            f"{config} batch {batch:>4} {source:<10} {row['steps_per_s']:>8.2f} steps/s "
            f"{row['images_per_s']:>9.1f} img/s"
        )

    def write_report(quiet: bool = True) -> None:
        """Saved after every row, so a stage cut short by a time limit still leaves its results."""

        def best(config, source, batch):
            return next(
                (
                    r["images_per_s"]
                    for r in rows
                    if (r["config"], r["source"], r["batch_size"]) == (config, source, batch)
                ),
                None,
            )

        ratios = {}
        for batch in {r["batch_size"] for r in rows}:
            a, d = best("a", "synthetic", batch), best("d", "synthetic", batch)
            if a and d:
                ratios[f"d_over_a_synthetic_b{batch}"] = round(d / a, 2)
            native = best("d", "native", batch)
            if native and d:
                ratios[f"native_end_to_end_over_ceiling_b{batch}"] = round(native / d, 2)
            if native:  # 300 epochs of the COVID-19 Radiography Database, two views per image
                ratios[f"minutes_300_epochs_covid_native_d_b{batch}"] = round(300 * COVID_IMAGES / native / 60, 1)
        name = device_name(device)
        report = {
            "benchmark": "train_speed",
            "date": date.today().isoformat(),
            "device": name,
            "size": args.size,
            "steps": args.steps,
            "warmup": args.warmup,
            "results": rows,
            "ratios": ratios,
        }
        report_save(report, f"train_speed-{device.type}", args.json, quiet=quiet)

    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for config in args.configs.split(","):
            settings = CONFIGS[config]
            step = make_step(device, **settings)
            views = torch.rand(2, batch, 1, args.size, args.size, device=device)
            record(
                config,
                batch,
                "synthetic",
                timed(step, itertools.repeat((views[0], views[1])), args.warmup, args.steps, device),
            )
            if args.data is None:
                continue
            if config == "a":  # the study's own loader
                data = PackedDataset(args.data)
                files = export_pngs(data, data.indices("train"), Path(f"/tmp/twinray-train-speed-{batch}"))
                loader = torch.utils.data.DataLoader(
                    PngPairs(files, study_transform(recipe)),
                    batch_size=batch,
                    shuffle=True,
                    drop_last=True,
                    num_workers=len(os.sched_getaffinity(0)),  # every core, as in bench/pipeline.py
                    persistent_workers=True,
                    pin_memory=device.type == "cuda",
                )
                pairs = ((v1.to(device), v2.to(device)) for v1, v2 in cycle(loader))
                record(config, batch, "baseline", timed(step, pairs, args.warmup, args.steps, device))
                continue
            for backend in args.backends.split(","):
                loader = build_loader(
                    str(args.data), backend=backend, batch_size=batch, device=device, recipe=recipe, size=args.size
                )
                pairs = (b.views for b in cycle(loader))
                record(config, batch, backend, timed(step, pairs, args.warmup, args.steps, device))

    write_report(quiet=False)


if __name__ == "__main__":
    main()
