"""What a run leaves to read besides metrics.jsonl: train.log, plain progress lines off a terminal, the trackers
named by --report-to, and curves.png (docs/pretrain.md, "Logs and trackers").

- `RunLog`: train.log in the run directory, plain text: the command line, versions, device and resolved config at
  the start, then one line per epoch; a resumed run appends a separator line naming the checkpoint and a new header.
- `progress`: tqdm on a terminal; anywhere else (a file, a pipe, a job's log) `PlainProgress`, which prints whole
  lines, one per tenth of the total or every `seconds`, never a carriage return.
- `parse_report_to` and `check_trackers`: the Accelerate trackers a run logs to, each package checked up front.
- `curves` and `draw_curves`: metrics.jsonl drawn as curves.png (loss, kNN, probe, lr, images/s, health) against
  the epoch, with no tracker needed.
"""

from __future__ import annotations

import importlib
import json
import math
import platform
import shlex
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tqdm import tqdm

from twinray.atomic import atomic, naming

# --report-to's names: each tracker Accelerate knows by that name, and the package it needs.
TRACKERS = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow"}


# --- train.log -------------------------------------------------------------------------------------------------
def command_line(argv: list[str] | None, prog: str) -> str:
    """The command as a shell would take it: sys.argv when `argv` is None (a script), else `prog` (as
    twinray/usage.py `program` names the tool: `twinray pretrain`, `python -m ...`) and `argv` (a main() called
    in-process or through the `twinray` command)."""
    if argv is None:
        return shlex.join(sys.argv)
    return " ".join([prog, shlex.join(map(str, argv))]).strip()  # prog may be two words: `twinray pretrain`


def versions() -> str:
    """What produced the run: "twinray 0.1.0, torch 2.x, timm 1.x, python 3.x"."""
    import timm
    import torch

    try:
        own = version("twinray")
    except PackageNotFoundError:  # run from a checkout that was never installed
        own = "unknown"
    return f"twinray {own}, torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class RunLog:
    """train.log at `path`; with `path` None (a process other than the main one) every call writes nothing.

    `start` writes the header: a new file for a fresh run (replacing one a run killed before its first checkpoint
    left), appended after a separator line for a resumed one. `line` appends one time-stamped line. A full disk is
    an OSError naming train.log (twinray/atomic.py `naming`)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None

    def start(self, command: str, device: str, config: dict, resumed: str | None = None) -> None:
        """`config`: the resolved settings, one `name: value` line each (values as JSON). `resumed`: what the run
        resumes from (e.g. "checkpoint-00000012: epoch 1, step 4 of 6"), which the separator line names."""
        if self.path is None:
            return
        head = f"==== resumed from {resumed}, {_now()} ====" if resumed else f"==== started {_now()} ===="
        lines = [
            head,
            f"command: {command}",
            f"versions: {versions()}",
            f"device: {device}",
            "config:",
            *(f"  {k}: {json.dumps(v)}" for k, v in config.items()),
        ]
        text = "\n".join(lines) + "\n"
        if resumed and self.path.is_file():
            with naming(self.path), open(self.path, "a") as f:
                f.write(text)
        else:
            with atomic(self.path) as tmp:
                tmp.write_text(text)

    def line(self, text: str) -> None:
        """Appends "YYYY-MM-DD HH:MM:SS text"."""
        if self.path is None:
            return
        with naming(self.path), open(self.path, "a") as f:
            f.write(f"{_now()} {text}\n")


# --- progress --------------------------------------------------------------------------------------------------
class PlainProgress:
    """The part of tqdm's interface the training loops use (update, set_postfix, close, `with`), for a stream that
    is not a terminal: a whole line "DESC: N/TOTAL (P%) S s  key value ..." each time another `fraction` of the
    total is done or `seconds` have passed since the last line, whichever comes first, and at close if steps were
    done since the last line. No carriage returns. `disable`: prints nothing (processes other than the main one)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", file=None, disable: bool = False,
                 seconds: float = 30.0, fraction: float = 0.1):  # fmt: skip
        self.total, self.n, self.desc = total, initial, desc
        self.file, self.disable, self.seconds = file, disable, seconds
        self.every = max(1, math.ceil(total * fraction))
        self.postfix: dict = {}
        self._start = self._last = time.monotonic()
        self._said = initial
        self._next = (initial // self.every + 1) * self.every

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or time.monotonic() - self._last >= self.seconds:
            self._say()

    def set_postfix(self, **values) -> None:
        """Shown on the next line printed (not a line of its own)."""
        self.postfix = values

    def close(self) -> None:
        if self.n != self._said:
            self._say()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _say(self) -> None:
        self._last, self._said = time.monotonic(), self.n
        self._next = (self.n // self.every + 1) * self.every
        if self.disable:
            return
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        elapsed = time.monotonic() - self._start
        print(f"{self.desc}: {self.n}/{self.total}{share} {elapsed:.1f} s{extra}", file=self.file or sys.stderr,
              flush=True)  # fmt: skip


def progress(total: int, initial: int = 0, desc: str = "", disable: bool = False, leave: bool = False):
    """A progress bar on stderr: tqdm's when stderr is a terminal, else a PlainProgress (whole lines)."""
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, initial=initial, desc=desc, disable=disable, leave=leave, file=stream)
    return PlainProgress(total, initial=initial, desc=desc, file=stream, disable=disable)


# --- trackers --------------------------------------------------------------------------------------------------
def parse_report_to(text: str) -> tuple[str, ...]:
    """The trackers --report-to names: "wandb,tensorboard" -> ("wandb", "tensorboard"); "none" -> (). Raises
    ValueError, one line naming the value, for a name that is not a tracker or "none" beside a tracker."""
    names = tuple(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    valid = ", ".join([*TRACKERS, "none"])
    for name in names:
        if name not in TRACKERS and name != "none":
            raise ValueError(f"--report-to {name!r} is not one of: {valid} (comma-separated)")
    if "none" in names and len(names) > 1:
        raise ValueError(f"--report-to {text!r}: none goes alone")
    return tuple(n for n in names if n != "none")


def check_trackers(names: tuple[str, ...]) -> list[str]:
    """`names` as Accelerate's `log_with`, once each tracker's package imports. Raises ValueError, one line naming
    the missing package, otherwise."""
    for name in names:
        package = TRACKERS[name]
        try:
            importlib.import_module(package)
        except ImportError:
            hint = ", or pass --wandb disabled" if name == "wandb" else ""
            raise ValueError(
                f"{package} is not installed: pip install {package}, or leave {name} out of --report-to{hint}"
            ) from None
    return list(names)


# --- curves.png ------------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line cut short by a kill is skipped; none when there is no file (a run stopped before
    its first logged step)."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _epoch_axis(rows: list[dict]):
    """x(row): an epoch-end row at epoch + 1; a step row at its fraction of the epoch, from the steps where the
    epochs ended (the last epoch's length for an epoch that has no end yet). None when no epoch has ended: then x
    is the step."""
    ends = {r["epoch"]: r["step"] for r in rows if r.get("epoch_end")}
    if not ends:
        return None
    starts = {e + 1: s for e, s in ends.items()}
    starts.setdefault(0, 0)
    lengths = [ends[e] - starts[e] for e in sorted(ends) if e in starts and ends[e] > starts[e]]

    def x(row: dict) -> float:
        e = row["epoch"]
        if row.get("epoch_end"):
            return e + 1
        start, end = starts.get(e), ends.get(e)
        if start is not None and end is not None and end > start:
            return e + (row["step"] - start) / (end - start)
        if start is not None and lengths:
            return e + (row["step"] - start) / lengths[-1]
        return float(e)

    return x


def curves(rows: list[dict]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """The panels curves.png draws from metrics.jsonl's rows: {panel: {series: (x, y)}}, in drawing order, x in
    epochs (or steps, before any epoch has ended). Panels: "loss" (each logged step, and each epoch's mean),
    "kNN" (knn_* figures), "probe" (the linear probe's figures but its loss), "lr", "images/s" (from the step
    rows), and "rankme" and "emb_std" (the health figures, docs/health.md); a panel without values is left out."""
    axis = _epoch_axis(rows)
    x = axis or (lambda r: float(r["step"]))
    steps = [r for r in rows if not r.get("epoch_end")]
    epochs = [r for r in rows if r.get("epoch_end")]

    def series(among: list[dict], key: str) -> tuple[list[float], list[float]]:
        found = [r for r in among if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        return [x(r) for r in found], [float(r[key]) for r in found]

    def keys(prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
        return list(dict.fromkeys(k for r in epochs for k in r if k.startswith(prefix) and k not in skip))

    panels = {
        "loss": {"step": series(steps, "loss"), "epoch mean": series(epochs, "loss")},
        "kNN": {k: series(epochs, k) for k in keys("knn_")},
        "probe": {k: series(epochs, k) for k in keys("probe_", skip=("probe_loss",))},
        "lr": {"lr": series(steps, "lr")},
        "images/s": {"images/s": series(steps, "images_per_s")},
        "rankme": {"rankme": series(epochs, "rankme")},
        "emb_std": {"emb_std": series(epochs, "emb_std")},
    }
    kept = {}
    for name, lines in panels.items():
        lines = {label: xy for label, xy in lines.items() if xy[0]}
        if lines:
            kept[name] = lines
    return kept


def draw_curves(metrics: Path, png: Path) -> dict:
    """Draws metrics.jsonl (`metrics`) as one PNG (`png`, written atomically; matplotlib's Agg backend): one panel
    per entry of `curves`, three to a row. Returns the panels drawn ({} and no file when there is nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    panels = curves(rows)
    if not panels:
        return panels
    xlabel = "epoch" if _epoch_axis(rows) else "step"
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for label, (xs, ys) in lines.items():
            marker = "o" if len(xs) < 30 or label == "epoch mean" else None
            ax.plot(xs, ys, label=label, marker=marker, markersize=3, linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    with atomic(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return panels
