"""The study's resource grid (its figures 3 and 4): time and peak memory of a Barlow Twins training step across
resolution x batch size x backbone x channels, under a memory cap, drawn as heatmaps.

    python bench/resources.py --device cuda --out bench/results/resources        # the full grid, 8 GiB cap
    python bench/resources.py --device cpu --resolutions 32,48 --batch-sizes 2,4 --backbones resnet18 \\
        --channels 1,3 --steps 2 --out DIR                                        # a tiny CPU grid

Each cell runs in its own process (so one cell's memory never leaks into the next): the trainer's own step
(train/step.py: two views through backbone and projector, the Barlow Twins loss, Adam), without the online probe,
timed after warm-up (CUDA events on a GPU). The cap is emulated with
`torch.cuda.set_per_process_memory_fraction` on a GPU and with an address-space limit on the CPU; a cell that
runs out of memory is recorded as OOM (grey) and the grid goes on. Hours per 100 epochs = step time x
ceil(dataset size / batch) x 100. `--compare` adds the study's setting (fp32, eager, NCHW) against twinray's
(bf16, compile, channels_last) for ResNet-18 with 1 channel at 224 px.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from twinray.bench.report import Stopwatch, device_name
from twinray.cli import OneLineParser, int_list, run_cli

FIELDS = [
    "backbone",
    "channels",
    "resolution",
    "batch_size",
    "precision",
    "compile",
    "channels_last",
    "status",
    "step_s",
    "hours_per_100_epochs",
    "peak_memory_mb",
    "error",
]


def parse_bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))


def hours_for_epochs(step_s: float, dataset_size: int, batch_size: int, epochs: int = 100) -> float:
    """Hours for `epochs` epochs at `step_s` seconds per step. An epoch is ceil(dataset_size / batch_size) steps:
    the last, partial batch is a step too, as in the study's DataLoader (drop_last off)."""
    return step_s * math.ceil(dataset_size / batch_size) * epochs / 3600


def run_cell(cell: dict) -> dict:
    """One grid cell, in this process: returns the row (status ok, oom or error)."""
    # Lazy, these four: they load torch, which the grid's own process never does (each cell runs in a process of
    # its own, under its memory cap).
    import torch

    from twinray.train.methods.barlow import BarlowTwinsMethod  # lazy: torch, only in a cell's process
    from twinray.train.model import BarlowTwins  # lazy: torch, only in a cell's process
    from twinray.train.optim import build_optimizer  # lazy: torch, only in a cell's process
    from twinray.train.step import Autocast, compile_model, train_step  # lazy: torch, as above

    device = torch.device(cell["device"])
    if device.type == "cuda" and device.index is None:  # set_per_process_memory_fraction wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    row = {k: cell[k] for k in FIELDS if k in cell}
    cap = cell.get("memory_cap")
    if cap and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    elif cap:
        import resource

        # The address space already mapped (libraries) is not the model's: the cap applies on top of it.
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + cap, mapped + cap))
    try:
        model = BarlowTwins(cell["backbone"], cell["channels"], "512").to(device)
        layout = torch.channels_last if cell["channels_last"] else torch.contiguous_format
        model = model.to(memory_format=layout)
        optimizer = build_optimizer(model, "adam", lr=2e-3, weight_decay=1e-5)  # the study's, as in pretrain
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cell["precision"])
        forward = Autocast(compile_model(model, cell["compile"]), dtype)
        scaler = torch.amp.GradScaler(device.type) if cell["precision"] == "fp16" else None
        shape = (cell["batch_size"], cell["channels"], cell["resolution"], cell["resolution"])
        views = [torch.rand(shape, device=device).contiguous(memory_format=layout) for _ in range(2)]
        method = BarlowTwinsMethod()

        def step():  # the trainer's step (train/step.py), without the online probe
            train_step(forward, method, views, optimizer, scaler=scaler)

        for _ in range(cell["warmup"]):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock = Stopwatch(device)
        clock.start()
        for _ in range(cell["steps"]):
            step()
        step_s = round(clock.stop() / cell["steps"], 6)  # rounded before use: the row's hours follow from its step_s
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process' peak RSS
        hours = hours_for_epochs(step_s, cell["dataset_size"], cell["batch_size"], epochs=100)
        row.update(status="ok", step_s=step_s, peak_memory_mb=round(peak, 1), hours_per_100_epochs=round(hours, 3))
    except (torch.OutOfMemoryError, MemoryError) as e:
        row.update(status="oom", error=str(e).splitlines()[0][:200])
    except RuntimeError as e:
        oom = "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower()
        row.update(status="oom" if oom else "error", error=str(e).splitlines()[0][:200])
    return row


def grid_cells(args) -> list[dict]:
    cells = []
    for backbone in args.backbones.split(","):
        for channels in args.channels:
            for resolution in args.resolutions:
                for batch in args.batch_sizes:
                    cells.append(
                        dict(
                            backbone=backbone,
                            channels=channels,
                            resolution=resolution,
                            batch_size=batch,
                            precision=args.precision,
                            compile=args.compile,
                            channels_last=args.channels_last,
                        )
                    )
    return cells


def run_isolated(cell: dict, timeout: int) -> dict:
    row = {k: cell[k] for k in FIELDS if k in cell}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--cell", json.dumps(cell)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:  # a slow cell (a long compile, say) is recorded, and the grid goes on
        return {**row, "status": "timeout", "error": f"over {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    # A process killed for memory (or a CUDA abort) is an OOM cell too; anything else is kept as an error.
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    # Only out-of-memory wording counts: "memory" alone also names functions in any traceback.
    words = ("out of memory", "outofmemoryerror", "memoryerror", "bad_alloc", "allocate memory")
    oom = proc.returncode < 0 or any(w in proc.stderr.lower() for w in words)
    return {**row, "status": "oom" if oom else "error", "error": tail}


def draw_heatmaps(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = sorted({(r["backbone"], r["channels"]) for r in rows})
    resolutions = sorted({r["resolution"] for r in rows})
    batches = sorted({r["batch_size"] for r in rows})
    ok = [r["hours_per_100_epochs"] for r in rows if r["status"] == "ok"]
    vmin, vmax = (min(ok), max(ok)) if ok else (0, 1)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1.5, 3.4), squeeze=False, sharey=True)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightgrey")  # OOM
    for ax, (backbone, channels) in zip(axes[0], panels):
        grid = np.full((len(resolutions), len(batches)), np.nan)
        labels = {}  # grey cells say why: OOM, timeout or error
        for r in rows:
            if (r["backbone"], r["channels"]) == (backbone, channels):
                at = resolutions.index(r["resolution"]), batches.index(r["batch_size"])
                labels[at] = "OOM" if r["status"] == "oom" else r["status"]
                if r["status"] == "ok":
                    grid[at] = r["hours_per_100_epochs"]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(
                j,
                i,
                labels.get((i, j), "") if np.isnan(value) else f"{value:.2g}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if np.isnan(value) else "white",
            )
        ax.set_xticks(range(len(batches)), batches)
        ax.set_yticks(range(len(resolutions)), resolutions)
        ax.set_xlabel("batch size")
        ax.set_title(f"{backbone}, {channels} ch", fontsize=9)
    axes[0][0].set_ylabel("resolution (px)")
    fig.colorbar(image, ax=axes[0].tolist(), label="hours per 100 epochs (grey: out of memory)")
    path = out / "heatmaps.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_memory(rows: list[dict], out: Path) -> Path:
    """Peak memory per model against batch size, at the largest resolution each model ran (like figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for backbone, channels in sorted({(r["backbone"], r["channels"]) for r in rows}):
        mine = [r for r in rows if (r["backbone"], r["channels"]) == (backbone, channels) and r["status"] == "ok"]
        if not mine:
            continue
        resolution = max(r["resolution"] for r in mine)
        points = sorted((r["batch_size"], r["peak_memory_mb"]) for r in mine if r["resolution"] == resolution)
        ax.plot(*zip(*points), marker="o", label=f"{backbone} {channels}ch @{resolution}px")
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak memory (MiB)")
    ax.legend(fontsize=7)
    path = out / "memory.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_compare(result: dict, out: Path) -> Path:
    """Hours per 100 epochs by batch size, the study's setting beside twinray's (OOM: no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    batches = sorted({c["batch_size"] for r in result.values() for c in r["cells"]})
    width = 0.8 / len(result)
    for k, (name, r) in enumerate(result.items()):
        hours = {c["batch_size"]: c.get("hours_per_100_epochs") for c in r["cells"] if c["status"] == "ok"}
        xs = [i + k * width for i, b in enumerate(batches) if b in hours]
        mode = "compile" if r["compile"] else "eager"
        label = f"{name} ({r['precision']}, {mode}, largest batch {r['largest_batch_that_fits']})"
        ax.bar(xs, [hours[b] for b in batches if b in hours], width, label=label)
    ax.set_xticks([i + width * (len(result) - 1) / 2 for i in range(len(batches))], batches)
    ax.set_xlabel("batch size (ResNet-18, 1 channel, 224 px)")
    ax.set_ylabel("hours per 100 epochs")
    ax.legend(fontsize=7, loc="lower center")
    path = out / "compare.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def compare(args, base: dict) -> dict:
    """The study's setting against twinray's for ResNet-18, 1 channel, 224 px."""
    settings = {
        "study": dict(precision="fp32", compile=False, channels_last=False),
        "twinray": dict(precision="bf16", compile=True, channels_last=True),
    }
    result = {}
    for name, setting in settings.items():
        rows = [
            run_isolated(
                {**base, "backbone": "resnet18", "channels": 1, "resolution": 224, "batch_size": b, **setting},
                args.timeout,
            )
            for b in args.batch_sizes
        ]
        fits = [r["batch_size"] for r in rows if r["status"] == "ok"]
        at_128 = next((r for r in rows if r["batch_size"] == 128 and r["status"] == "ok"), None)
        result[name] = {
            **setting,
            "largest_batch_that_fits": max(fits) if fits else None,
            "hours_per_100_epochs_b128": at_128["hours_per_100_epochs"] if at_128 else None,
            "cells": rows,
        }
    return result


def save_tables(rows: list[dict], args, base: dict) -> dict:
    """cells.csv and cells.json, rewritten after every cell so that a grid cut short keeps what it measured."""
    with open(args.out / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    device = device_name(args.device)
    report = {
        "benchmark": "resources",
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "memory_cap_bytes": base["memory_cap"],
        "dataset_size": args.dataset_size,
        "cells": rows,
    }
    (args.out / "cells.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int_list, default="128,224,256,384,512")
    parser.add_argument("--batch-sizes", type=int_list, default="16,32,64,128,256,512")
    parser.add_argument("--backbones", default="resnet18,resnet34,resnet50,resnet101,efficientnet_b0")
    parser.add_argument("--channels", type=int_list, default="1,3")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--memory-cap", default="8GiB", help="e.g. 8GiB; 0 for none")
    parser.add_argument("--dataset-size", type=int, default=21165)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--compare", action="store_true", help="also the study's setting against twinray's")
    parser.add_argument("--out", type=Path, default=Path("bench/results/resources"))
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell and print its row
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return

    base = dict(
        device=args.device,
        memory_cap=parse_bytes(args.memory_cap),
        dataset_size=args.dataset_size,
        steps=args.steps,
        warmup=args.warmup,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cell in grid_cells(args):
        row = run_isolated({**base, **cell}, args.timeout)
        rows.append(row)
        shown = (
            f"{row['hours_per_100_epochs']} h/100 ep, {row['peak_memory_mb']} MiB"
            if row["status"] == "ok"
            else row["status"]
        )
        print(f"{cell['backbone']:<16} {cell['channels']}ch {cell['resolution']:>4}px b{cell['batch_size']:<4} {shown}")
        report = save_tables(rows, args, base)  # after every cell: a grid cut short keeps what it measured
    if args.compare:
        report["compare"] = compare(args, base)
        draw_compare(report["compare"], args.out)
    (args.out / "cells.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"wrote {args.out / 'cells.csv'}, {args.out / 'cells.json'}, {draw_heatmaps(rows, args.out)}, "
        f"{draw_memory(rows, args.out)}"
    )


if __name__ == "__main__":
    run_cli(main, "resources")
