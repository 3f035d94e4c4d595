"""The trainer's own speed: images/s of pretrain's step and loop, at the compute ceiling and end to end.

    python bench/train_speed.py --device cuda --data data/demo/packed --json out.json
    python bench/train_speed.py --configs d --compile-modes default,max-autotune-no-cudagraphs,reduce-overhead
    python bench/train_speed.py --device cpu --size 64 --batch-sizes 32 --steps 5 --data data/demo/packed
    python bench/train_speed.py --methods barlow,simclr,moco,byol,vicreg --configs d --batch-sizes 128

What runs is the trainer's: the run is built by train/state.py's `build_run` (model, optimizer, lr schedule, online
probe) and each step is train/step.py's `train_step` followed by train/meter.py's `StepMeter.push`, which reads the
previous step's figures, as train/pretrain.py's loop does. Sources of batches:
    synthetic  batches already on the device, made once: the compute ceiling
    <backend>  the loader (native, dali, ffcv), epoch after epoch as pretrain iterates it: end to end; with
               --caches, the native loader once per cache mode (`native-host`, ...), as bench/pipeline.py names them
    baseline   the study's per-image PIL + torchvision DataLoader (config a only)
Each --methods entry (train/pretrain.py's --method, at its defaults: head, optimizer, momentum encoder, queue, ...)
is measured in turn; each row names its method and the peak memory of its measurement (CUDA: the allocator's peak,
reset before each; CPU: the process' peak resident set so far, which only grows, so read it in the order run).
Configurations, each adding one thing to the one before:
    a  the study's: eager, fp32, NCHW (end to end with the study's loader)
    b  a + channels_last
    c  b + bf16 autocast (on the forward, as Accelerate applies it)
    d  c + torch.compile: twinray's CUDA default; once per --compile-modes entry
The first --warmup steps (compilation, cuDNN autotuning, allocator growth) are not timed. The timed steps are
measured with CUDA events on CUDA and perf_counter on the CPU, and data_wait is the fraction of that time spent
waiting for the loader. Images/s counts images, each seen as two views. The JSON (naming the device) goes to
bench/results/train_speed-<device>.json, and to --json too when given.
"""

from __future__ import annotations

import argparse
import itertools
import os
from datetime import date
from pathlib import Path

import torch

from twinray.bench.pipeline import PngPairs, export_pngs, study_transform
from twinray.bench.report import Stopwatch, device_name
from twinray.bench.report import save as report_save
from twinray.cli import OneLineParser, int_list, run_cli, say_error
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import load_recipe
from twinray.pipelines.base import Batch
from twinray.pipelines.cache import CACHES
from twinray.prep.open_dataset import open_dataset
from twinray.train.config import CHOICES, PretrainConfig
from twinray.train.labels import POSITIVE, UNCERTAIN
from twinray.train.meter import StepMeter
from twinray.train.state import build_run
from twinray.train.step import COMPILE_MODES, Autocast, compile_model, train_step

COVID_IMAGES = 21_165
CONFIGS = {
    "a": dict(channels_last=False, bf16=False, compile=False),
    "b": dict(channels_last=True, bf16=False, compile=False),
    "c": dict(channels_last=True, bf16=True, compile=False),
    "d": dict(channels_last=True, bf16=True, compile=True),
}


class Labels:
    """The dataset's label shape, for the probe: `classes` and whether they are multilabel codes."""

    def __init__(self, data: Path | None):
        packed = open_dataset(data) if data else None
        self.classes = len(packed.classes) if packed else 4
        self.multilabel = packed is not None and packed.task == "multilabel"

    def make(self, batch: int, device, random: bool = True) -> torch.Tensor:
        """int64 B class indices, or int8 B x C codes (POSITIVE, NEGATIVE, UNCERTAIN: prep/format.py); random, or
        all 0."""
        low, high = (UNCERTAIN, POSITIVE + 1) if self.multilabel else (0, self.classes)
        low, high = (low, high) if random else (0, 1)
        shape, dtype = ((batch, self.classes), torch.int8) if self.multilabel else ((batch,), torch.int64)
        return torch.randint(low, high, shape, dtype=dtype, device=device)


class Trainer:
    """pretrain's model, optimizer, probe and step for one configuration, on one device."""

    def __init__(self, cfg, device, labels: Labels, channels_last: bool, bf16: bool, compile: bool, mode: str):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.run = build_run(cfg, device, 1000, labels.classes, labels.multilabel, memory_format=layout)
        self.forward = Autocast(compile_model(self.run.model, compile, mode), torch.bfloat16 if bf16 else None)
        self.layout = layout

    def step(self, batch: Batch, meter: StepMeter) -> int:
        """One step of pretrain's loop; returns the images it trained on."""
        views = [v.contiguous(memory_format=self.layout) for v in batch.views]  # a no-op but for a's NCHW
        run = self.run
        figures = train_step(self.forward, run.method, views, run.optimizer, probe=run.probe, labels=batch.labels)
        run.scheduler.step()
        meter.push(figures, images=views[0].shape[0])
        return views[0].shape[0]


def measure(trainer: Trainer, batches, warmup: int, steps: int, device) -> dict:
    """`warmup` untimed steps, then `steps` timed ones, each on the next batch of `batches`. Returns seconds, the
    images trained on in the timed steps, and the fraction of the time spent waiting for batches."""
    meter, clock = StepMeter(), Stopwatch(device)
    batches = meter.batches(batches)
    for _ in range(warmup):
        trainer.step(next(batches), meter)
    meter.settle()  # the warm-up's last step has finished: the clock starts on an idle device
    meter.restart()
    clock.start()
    images = sum(trainer.step(next(batches), meter) for _ in range(steps))
    meter.settle()
    seconds = clock.stop()
    wait = meter.window()["data_wait"]
    return {"seconds": seconds, "images": images, "data_wait": wait, "peak_memory_mb": peak(device)}


def reset_peak(device) -> None:
    """Start a new peak: the CUDA allocator's, or on Linux the process' resident-set high-water mark (VmHWM), which
    writing 5 to /proc/self/clear_refs resets to the current resident set (proc(5))."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or a kernel without it: the peak then stays the process' peak so far
        pass


def peak(device) -> float:
    """MiB: the CUDA allocator's peak since reset_peak; on the CPU the process' resident-set peak (VmHWM) since
    reset_peak, which includes what the process held before it (the interpreter, torch, the data)."""
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        status = Path("/proc/self/status").read_text()
        return round(int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def epochs(loader):
    """The loader's batches epoch after epoch, as pretrain iterates it (set_epoch, then the epoch)."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def synthetic(batch: int, size: int, device, layout: torch.memory_format, labels: Labels, count: int = 2):
    """`count` batches of random views (in `layout`) and labels made once on the device, yielded in turn forever."""
    made = [
        Batch(
            views=tuple(
                torch.rand(batch, 1, size, size, device=device).contiguous(memory_format=layout) for _ in range(2)
            ),
            labels=labels.make(batch, device),
            indices=torch.arange(batch),
        )
        for _ in range(count)
    ]
    return itertools.cycle(made)


def study_batches(data: Path, batch: int, size: int, device, labels: Labels):
    """The study's DataLoader over the train images written out as PNGs, moved to the device. Its pairs carry no
    labels; the probe gets zeros."""
    packed = open_dataset(data)
    files = export_pngs(packed, packed.indices("train"), Path(f"/tmp/twinray-train-speed-{batch}"))
    loader = torch.utils.data.DataLoader(
        PngPairs(files, study_transform(load_recipe("seed-final", size=size))),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=len(os.sched_getaffinity(0)),  # every core, as in bench/pipeline.py
        persistent_workers=True,
        pin_memory=torch.device(device).type == "cuda",
    )
    zeros = labels.make(batch, device, random=False)
    while True:
        for v1, v2 in loader:
            yield Batch((v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)), zeros, None)


def loader_batches(data: Path, backend: str, cache: str, batch: int, size: int, device):
    """The trainer's loader (pretrain's arguments, with `cache`), epoch after epoch. A cache fills on the first
    batch, inside the untimed warm-up."""
    settings = LoaderSettings(
        split="train", batch_size=batch, device=device, recipe="seed-final", size=size, views=2, drop_last=True
    )
    with build_loader(str(data), settings, backend=backend, cache=cache) as loader:  # closing this generator closes it
        yield from epochs(loader)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, default=None, help="a packed dataset for the end-to-end runs")
    parser.add_argument("--backends", default="native,dali,ffcv")
    parser.add_argument("--caches", default="none", help=f"loader cache modes, of {', '.join(CACHES)}")
    parser.add_argument("--methods", default="barlow", help=f"pretraining methods, of {', '.join(CHOICES['method'])}")
    parser.add_argument("--configs", default="a,b,c,d")
    parser.add_argument("--compile-modes", default="default", help=f"for config d, of {', '.join(COMPILE_MODES)}")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int_list, default="128,256")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (at least 1: compilation)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    configs, caches = args.configs.split(","), args.caches.split(",")
    modes, methods = args.compile_modes.split(","), args.methods.split(",")
    bad = [c for c in configs if c not in CONFIGS] + [m for m in modes if m not in COMPILE_MODES]
    bad += [m for m in methods if m not in CHOICES["method"]]
    bad += [c for c in caches if c not in CACHES]
    if bad or args.warmup < 1 or args.steps < 1:
        why = f"unknown {', '.join(bad)}" if bad else "need --warmup >= 1 and --steps >= 1"
        say_error("train_speed", why)
        return 2
    device = torch.device(args.device)
    rows: list[dict] = []
    report = {
        "benchmark": "train_speed",
        "date": date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": rows,
        "ratios": {},
    }

    def record(config: str, mode: str | None, batch: int, source: str, measured: dict) -> None:
        seconds = measured["seconds"]
        row = {
            "method": method,
            "config": config,
            "compile_mode": mode,
            "batch_size": batch,
            "source": source,
            "steps_per_s": round(args.steps / seconds, 3),
            "images_per_s": round(measured["images"] / seconds, 1),
            "images": measured["images"],
            "seconds": round(seconds, 4),
            "data_wait": round(measured["data_wait"], 3),
            "peak_memory_mb": measured["peak_memory_mb"],
        }
        rows.append(row)
        report["ratios"] = ratios(rows)
        # Saved after every row, so that a run cut short by a time limit keeps what it measured.
        report_save(report, f"train_speed-{device.type}", args.json, quiet=True)
        name = f"{method} {config}/{mode}" if mode else f"{method} {config}"
        speed = f"{row['steps_per_s']:>8.2f} steps/s {row['images_per_s']:>9.1f} img/s"
        memory = f"data wait {row['data_wait']:.0%}  peak {row['peak_memory_mb']:.0f} MiB"
        print(f"{name:<37} batch {batch:>4} {source:<12} {speed}  {memory}", flush=True)

    labels = Labels(args.data)
    for method, batch in itertools.product(methods, args.batch_sizes):
        # the study's settings (model, optimizer, lambda) for barlow; each other method at its defaults
        cfg = PretrainConfig(method=method, size=args.size, batch_size=batch).validate()
        for config in configs:
            for mode in modes if CONFIGS[config]["compile"] else [None]:
                torch.manual_seed(0)
                reset_peak(device)
                trainer = Trainer(cfg, device, labels, **CONFIGS[config], mode=mode or "default")
                ceiling = synthetic(batch, args.size, device, trainer.layout, labels)
                measured = measure(trainer, ceiling, args.warmup, args.steps, device)
                record(config, mode, batch, "synthetic", measured)
                if args.data is None:
                    continue
                if config == "a":  # the study's own loader
                    batches = study_batches(args.data, batch, args.size, device, labels)
                    record(config, mode, batch, "baseline", measure(trainer, batches, args.warmup, args.steps, device))
                    batches.close()
                    continue
                for backend, cache in itertools.product(args.backends.split(","), caches):
                    batches = loader_batches(args.data, backend, cache, batch, args.size, device)
                    measured = measure(trainer, batches, args.warmup, args.steps, device)
                    record(config, mode, batch, backend if cache == "none" else f"{backend}-{cache}", measured)
                    batches.close()  # ends the epoch and closes the loader (its threads)
    report_save(report, f"train_speed-{device.type}", args.json)
    return 0


def ratios(rows: list[dict]) -> dict:
    """Headline ratios per batch size, of Barlow Twins: twinray's default (d, compile mode default) over the study's
    (a) on synthetic batches; each end-to-end source over d's ceiling, with the minutes 300 COVID-sized epochs would
    take at that speed; and each other compile mode over the default on synthetic batches. Then each other method's
    images/s over Barlow Twins' in the same configuration, source and batch (`simclr_over_barlow_a_synthetic_b128`)."""
    by_method = {
        (r.get("method", "barlow"), r["config"], r["compile_mode"], r["source"], r["batch_size"]): r["images_per_s"]
        for r in rows
    }
    speed = {key[1:]: value for key, value in by_method.items() if key[0] == "barlow"}
    out = {}
    for (config, mode, source, batch), value in speed.items():
        ceiling = speed.get(("d", "default", "synthetic", batch))
        if not ceiling:
            continue
        if (config, source) == ("a", "synthetic"):
            out[f"d_over_a_synthetic_b{batch}"] = round(ceiling / value, 2)
        elif (config, mode) == ("d", "default") and source != "synthetic":
            out[f"{source}_end_to_end_over_ceiling_b{batch}"] = round(value / ceiling, 2)
            out[f"minutes_300_epochs_covid_{source}_d_b{batch}"] = round(300 * COVID_IMAGES / value / 60, 1)
        elif config == "d" and mode != "default" and source == "synthetic":
            out[f"{mode}_over_default_b{batch}"] = round(value / ceiling, 2)
    for (method, config, mode, source, batch), value in by_method.items():
        barlow = by_method.get(("barlow", config, mode, source, batch))
        if method != "barlow" and barlow:
            out[f"{method}_over_barlow_{config}_{source}_b{batch}"] = round(value / barlow, 2)
    return out


if __name__ == "__main__":
    run_cli(main, "train_speed")
