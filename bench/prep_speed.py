"""How fast `prep covid` packs a COVID-scale sample, against a naive PIL loop that writes PNG files.

    python bench/prep_speed.py [--n 2000] [--repeats 3] [--out bench/results/prep-cpu.json]

All three runs read the same generated 299x299 PNGs from a warm page cache, so the ratios compare
conversion work only. Each figure is the median wall time of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from PIL import Image

from twinray.bench.report import cpu_name
from twinray.cli import OneLineParser, run_cli
from twinray.prep import build, sample
from twinray.prep.datasets import covid


def naive_pil_loop(src: Path, out: Path, size: int) -> int:
    """What the study's pipeline amounted to: one process, one image at a time, one PNG file each."""
    count = 0
    for path in sorted(src.glob("*/images/*.png")):
        with Image.open(path) as image:
            grey = image.convert("L")
            scale = size / min(grey.size)
            if scale < 1:
                grey = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.BOX)
            target = out / path.parent.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            grey.save(target)
        count += 1
    return count


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="generated images (at least 2000 for COVID scale)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/prep-cpu.json"))
    args = parser.parse_args()

    cores = build.default_workers()
    work = Path(args.work or tempfile.mkdtemp(prefix="twinray-bench-prep-"))
    src = sample.generate(work / "raw", n=args.n, seed=0, workers=cores)
    for path in src.rglob("*.png"):  # warm the page cache once so every run reads from memory
        path.read_bytes()
    plan = covid.plan(src)

    def run_pack(workers: int):
        def go():
            build.pack(plan, work / f"packed-{workers}", size=args.size, workers=workers, force=True, progress=False)

        return go

    def run_naive():
        shutil.rmtree(work / "naive", ignore_errors=True)
        naive_pil_loop(src, work / "naive", args.size)

    runs = {
        "naive PIL loop, PNG files": timed(run_naive, args.repeats),
        "prep covid, 1 worker": timed(run_pack(1), args.repeats),
        f"prep covid, {cores} workers": timed(run_pack(cores), args.repeats),
    }
    baseline = runs["naive PIL loop, PNG files"]
    one = runs["prep covid, 1 worker"]
    rows = [
        {
            "run": name,
            "seconds": round(t, 3),
            "images_per_s": round(args.n / t, 1),
            "speedup_vs_naive": round(baseline / t, 2),
        }
        for name, t in runs.items()
    ]
    scaling = one / runs[f"prep covid, {cores} workers"]
    result = {
        "benchmark": "prep",
        "date": date.today().isoformat(),
        "device": f"cpu: {cpu_name()}",
        "cores": cores,
        "images": args.n,
        "image_size": f"299x299 PNG -> shorter side {args.size}, jpeg q95",
        "repeats": args.repeats,
        "runs": rows,
        "worker_scaling": round(scaling, 2),
        "scaling_efficiency": round(scaling / cores, 2),
    }
    for row in rows:
        print(
            f"{row['run']:<28} {row['seconds']:>8.2f} s {row['images_per_s']:>9.1f} img/s "
            f"{row['speedup_vs_naive']:>6.2f}x naive"
        )
    print(f"scaling 1 -> {cores} workers: {scaling:.2f}x ({100 * scaling / cores:.0f}% of linear)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main, "prep_speed")
