"""What every benchmark script shares: naming the machine, and saving its JSON (in bench/results/, and to --json)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from twinray.atomic import write_json

# The record of each benchmark's latest run. Tests and dry runs point TWINRAY_BENCH_RESULTS elsewhere, so that they
# leave the committed results alone.
RESULTS = Path(os.environ.get("TWINRAY_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_name()}"


def save(report: dict, name: str, extra: Path | None = None, quiet: bool = False) -> None:
    """Writes RESULTS/<name>.json and, when given (--json), `extra` too; atomically, so that a run killed mid-write
    leaves the previous file whole."""
    paths = [RESULTS / f"{name}.json", *([Path(extra)] if extra else [])]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, report)
    if not quiet:
        print("wrote " + ", ".join(map(str, paths)))


def time_calls(call, warmup: int, count: int, device) -> float:
    """Seconds for `count` calls of `call()` after `warmup` untimed ones; CUDA work is waited for at both ends."""
    import torch

    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        call()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        call()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


class Stopwatch:
    """Elapsed seconds of device work. CUDA: two events on the current stream, so the time runs from when the
    stream reaches `start()` to when it has finished the work queued before `stop()`. CPU: perf_counter, since each
    op has finished when it returns."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self._events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Waits for the work queued so far, then returns the seconds since `start()`."""
        if self.cuda:
            self._events[1].record()
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1000
        return time.perf_counter() - self._t0
