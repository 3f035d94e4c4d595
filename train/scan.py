"""Grids of finetune or pretrain+finetune runs from one YAML file, with repeated seeds, one CSV and plots.

    python train/scan.py configs/scan-fractions.yaml [--out DIR] [--dry-run]

A finetune grid (label fractions x inits, table 8 / figure 11; freeze depth, figure 15):

    data: data/demo/packed
    out: runs/scan-fractions
    seeds: [0, 1, 2]
    finetune: {epochs: 15, size: 224}        # flags every finetune run gets
    grid: {init: [runs/pretrain, random, imagenet], fraction: [0.01, 0.1, 1.0]}

A pretraining sweep (recipe, projector, lambda: tables 4-7), each pretraining followed by finetunes:

    pretrain: {epochs: 50, size: 224}        # flags every pretraining run gets
    grid: {recipe: [base, seed-final], projector: ["512", "512-512"], fraction: [0.1, 1.0]}
    then: [linear, full]                     # finetune modes run on each pretrained backbone

Grid keys that are pretraining fields make one pretraining per value; the others (here `fraction`) vary only the
finetunes, which all start from the same pretraining.

Pretraining on one dataset and fine-tuning on another (the study's table 8: Barlow Twins on CheXpert, fine-tuned on
COVID): `pretrain` may name its own `data` (labelled or not), and `eval_data` to watch the finetunes' classes with
kNN during it; the top-level `data` is the finetunes':

    data: data/packed/covid
    pretrain: {data: data/packed/chexpert, eval_data: data/packed/covid, epochs: 50}

The whole file is checked before the first run starts (and by --dry-run): a slip is one line naming the key and
its value, exit code 2, and no run directory is made. Checked: the keys and each one's type; seeds, a non-empty list
of distinct whole numbers; grid values, non-empty lists of distinct single values; `then`, distinct modes; every
field of every run (train/config.py); each `init`, `imagenet`, `random`, or a pretraining run or backbone file that
exists (or one this scan pretrains); `metric`, one the runs' results hold for the dataset's task.

Every run has its own directory under `out`; a finished run (results.json, or backbone.safetensors for a
pretraining) is skipped, so an interrupted scan resumes where it stopped. Writes runs.csv (one row per run),
summary.csv (mean and 95% t-interval over seeds per cell) and scan.png (the spread of seeds around each mean).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

from twinray.atomic import write_csv
from twinray.cli import InputError, OneLineParser, run_cli
from twinray.config import check_fields, read_mapping
from twinray.train.config import ConfigError, FinetuneConfig, PretrainConfig, from_mapping, to_flags
from twinray.usage import examples, program

REPO = Path(__file__).resolve().parents[1]
KEYS = {"data", "out", "seeds", "finetune", "pretrain", "grid", "then", "metric"}
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "mean_auroc")
TASK_METRICS = {"multiclass": METRICS[:4], "multilabel": ("mean_auroc",)}  # what finetune's results hold per task
SET_BY_SCAN = ("data", "out", "seed")  # each run's: from the scan's data, out and seeds


def _distinct_list(path: Path, key: str, value, kinds: tuple[type, ...], what: str) -> list:
    """`value` as a non-empty list of distinct values of `kinds` (a bool counts only where `kinds` holds bool); else
    InputError naming `key` and `value`. `what` names one entry: "a whole number"."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{path}: {key} {value!r} is not a non-empty list of values, each {what}")
    for item in value:
        if not isinstance(item, kinds) or (isinstance(item, bool) and bool not in kinds):
            raise InputError(f"{path}: {key} {value!r}: {item!r} is not {what}")
    for k, item in enumerate(value):
        if item in value[:k]:
            raise InputError(f"{path}: {key} {value!r} lists {item!r} twice")
    return value


def load_config(path: Path) -> dict:
    """The scan's YAML, its keys and their types checked. Raises InputError in one line naming the key and value."""
    cfg = read_mapping(path, "scan")
    check_fields(cfg, KEYS, str(path), what="key")
    for key in ("data", "out", "grid"):
        if key not in cfg:
            raise InputError(f"{path}: missing {key!r}")
    for key in ("data", "out"):
        if not isinstance(cfg[key], str) or not cfg[key].strip():
            raise InputError(f"{path}: {key} {cfg[key]!r} is not a path")
    for key in ("finetune", "pretrain"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise InputError(f"{path}: {key} {cfg[key]!r} is not a mapping of field: value")
        for name in cfg.get(key, {}):
            own = key == "pretrain" and str(name) == "data"  # pretraining on another dataset than the finetunes'
            if str(name).replace("-", "_") in SET_BY_SCAN and not own:
                raise InputError(f"{path}: {key} {name}: set by the scan (from its data, out and seeds)")
        if key == "pretrain" and "data" in cfg.get(key, {}) and not isinstance(cfg[key]["data"], str):
            raise InputError(f"{path}: pretrain data {cfg[key]['data']!r} is not a path")
    if not isinstance(cfg["grid"], dict):
        raise InputError(f"{path}: grid {cfg['grid']!r} is not a mapping of flag: [values]")
    for name, values in cfg["grid"].items():
        if str(name).replace("-", "_") in SET_BY_SCAN:
            raise InputError(f"{path}: grid {name}: set by the scan (seeds: a list at the top level)")
        if not isinstance(values, list) or not values:
            raise InputError(f"{path}: grid {name} {values!r}: grid maps each flag to a non-empty list of values")
        _distinct_list(path, f"grid {name}", values, (str, int, float, bool), "a single value")
    if "then" in cfg and "pretrain" not in cfg:
        raise InputError(f"{path}: 'then' needs a 'pretrain' section")
    if "pretrain" in cfg:
        for name in ("init", "mode"):
            if name in cfg["grid"] or name in cfg.get("finetune", {}):
                raise InputError(
                    f"{path}: {name} {cfg['grid'].get(name, cfg.get('finetune', {}).get(name))!r}: a pretraining "
                    f"sweep sets each finetune's {name} (its own backbones; modes: 'then')"
                )
    cfg.setdefault("seeds", [0])
    _distinct_list(path, "seeds", cfg["seeds"], (int,), "a whole number")
    cfg.setdefault("then", ["linear", "full"])
    _distinct_list(path, "then", cfg["then"], (str,), "a mode (linear, full or freeze:K)")
    if "metric" in cfg and cfg["metric"] not in METRICS:
        raise InputError(f"{path}: metric {cfg['metric']!r} is not one of: {', '.join(METRICS)}")
    return cfg


def check_inputs(cfg: dict, runs: list[dict], path: Path) -> None:
    """What the runs read, before any starts: each finetune's init exists (or is a pretraining of this scan), and the
    metric is one the dataset's task yields. Raises InputError in one line naming the key and value."""
    made = {str(run["dir"]) for run in runs if run["kind"] == "pretrain"}
    for run in runs:
        init = getattr(run["config"], "init", None)
        if run["kind"] != "finetune" or init in ("imagenet", "random") or init in made:
            continue
        backbone = Path(init) / "backbone.safetensors" if Path(init).is_dir() else Path(init)
        if not (backbone.suffix == ".safetensors" and backbone.is_file()):
            raise InputError(
                f"{path}: init {init!r} is neither imagenet, random, a finished pretraining run (its "
                "backbone.safetensors) nor a .safetensors backbone; train/pretrain.py --out DIR makes one"
            )
    metric = cfg.get("metric")
    manifest = Path(str(cfg["data"])) / "manifest.json"
    if metric is not None and manifest.is_file():  # a URL's task is known once a run opens it
        task = json.loads(manifest.read_text()).get("task")
        if metric not in TASK_METRICS.get(task, METRICS):
            raise InputError(
                f"{path}: metric {metric!r}: the {task} dataset {cfg['data']} yields {', '.join(TASK_METRICS[task])}"
            )


def cell_name(cell: dict) -> str:
    """A directory name from a cell's values: init=runs/pretrain,fraction=0.1 -> init-pretrain_fraction-0.1."""
    parts = []
    for key, value in cell.items():
        text = Path(str(value)).name if "/" in str(value) else str(value)
        parts.append(f"{key}-{text}".replace(":", "").replace(" ", ""))
    return "_".join(parts)


def pretrain_keys(cfg: dict) -> list[str]:
    """In a pretraining sweep, the grid keys that are pretraining fields; the others (fraction, for example) vary
    the finetunes, so one pretraining serves every finetune cell."""
    from dataclasses import fields

    known = {f.name for f in fields(PretrainConfig)}
    return [k for k in cfg["grid"] if str(k).replace("-", "_") in known]


def plan(cfg: dict) -> list[dict]:
    """Every run, in order: {"kind", "cell", "seed", "dir", "config", "args"}; a pretraining comes before the
    finetunes that use it. `config` is the run's validated PretrainConfig or FinetuneConfig and `args` the flags
    that rebuild it, so a bad value anywhere in the scan raises ConfigError, naming the run, before anything runs."""
    out, grid = Path(cfg["out"]), cfg["grid"]
    runs = []

    def add(kind: str, cell: dict, seed: int, directory: Path, options: dict) -> Path:
        cls = PretrainConfig if kind == "pretrain" else FinetuneConfig
        values = {"data": str(cfg["data"]), **options, "seed": seed, "out": str(directory)}  # pretrain may name its own
        config = from_mapping(cls, values, f"{kind} in {directory}")
        given = {str(k).replace("-", "_") for k in values}
        runs.append({"kind": kind, "cell": cell, "seed": seed, "dir": directory, "config": config,
                     "args": to_flags(config, given)})  # fmt: skip
        return directory

    if "pretrain" not in cfg:
        for cell in cells(grid):
            for seed in cfg["seeds"]:
                add("finetune", cell, seed, out / cell_name(cell) / f"seed-{seed}", {**cfg.get("finetune", {}), **cell})
        return runs
    outer = pretrain_keys(cfg)
    inner = {k: v for k, v in grid.items() if k not in outer}
    for cell in cells({k: grid[k] for k in outer}):
        for seed in cfg["seeds"]:
            base = out / (cell_name(cell) or "pretrain") / f"seed-{seed}"
            pre = add("pretrain", cell, seed, base / "pretrain", {**cfg["pretrain"], **cell})
            for tune in cells(inner):
                for mode in cfg["then"]:
                    name = "_".join(filter(None, [f"finetune-{mode.replace(':', '')}", cell_name(tune)]))
                    options = {**cfg.get("finetune", {}), **tune, "init": str(pre), "mode": mode}
                    add("finetune", {**cell, **tune, "mode": mode}, seed, base / name, options)
    return runs


def cells(grid: dict) -> list[dict]:
    """Every combination of a grid's values, as {key: value} (one empty cell for an empty grid)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def finished(run: dict) -> bool:
    return (run["dir"] / ("results.json" if run["kind"] == "finetune" else "backbone.safetensors")).is_file()


def execute(run: dict) -> None:
    script = REPO / "train" / f"{run['kind']}.py"
    extra = ["--wandb", "disabled"] if run["kind"] == "pretrain" and "--wandb" not in run["args"] else []
    result = subprocess.run([sys.executable, str(script), *run["args"], *extra], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"{run['kind']} in {run['dir']} failed (exit {result.returncode}): {last}")


def t_interval(values: list[float]) -> float:
    """Half-width of the 95% t-interval of the mean (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    from scipy.stats import t

    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return float(t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values)))


def collect(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        if run["kind"] != "finetune" or not finished(run):
            continue
        test = json.loads((run["dir"] / "results.json").read_text())["test"]
        metrics = {m: test[m] for m in METRICS if test.get(m) is not None}
        cell = {k: str(v) for k, v in run["cell"].items()}
        rows.append({**cell, "seed": run["seed"], **metrics, "dir": str(run["dir"])})
    return rows


def summarise(rows: list[dict], keys: list[str]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault(tuple(row[k] for k in keys), []).append(row)
    return [
        mean_and_interval({**dict(zip(keys, cell)), "seeds": len(members)}, members) for cell, members in cells.items()
    ]


def mean_and_interval(entry: dict, members: list[dict], metrics=METRICS, digits: int = 6) -> dict:
    """`entry` with `{metric}_mean` and `{metric}_ci95` (t_interval's half-width) over the `members` rows that
    have the metric (None counts as missing), for each of `metrics`."""
    for m in metrics:
        values = [r[m] for r in members if r.get(m) is not None]
        if values:
            entry[f"{m}_mean"] = round(sum(values) / len(values), digits)
            entry[f"{m}_ci95"] = round(t_interval(values), digits)
    return entry


def draw(rows: list[dict], summary: list[dict], keys: list[str], metric: str, out: Path) -> Path:
    """With a `fraction` key: metric against label fraction (log x), one line per other cell, seeds as dots and the
    95% interval as a band (figure 11). Otherwise one bar per cell with its interval and seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if "fraction" in keys:
        others = [k for k in keys if k != "fraction"]
        groups = sorted({tuple(s[k] for k in others) for s in summary})
        for group in groups:
            label = ", ".join(f"{k}={Path(v).name}" for k, v in zip(others, group)) or metric
            points = sorted((float(s["fraction"]), s) for s in summary if tuple(s[k] for k in others) == group)
            x = [p for p, _ in points]
            mean = [s.get(f"{metric}_mean", math.nan) for _, s in points]
            ci = [s.get(f"{metric}_ci95", 0.0) for _, s in points]
            line = ax.plot(x, mean, marker="o", label=label)[0]
            ax.fill_between(x, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)],
                            color=line.get_color(), alpha=0.15)  # fmt: skip
            seeds = [r for r in rows if tuple(r[k] for k in others) == group and metric in r]
            xs, ys = [float(r["fraction"]) for r in seeds], [r[metric] for r in seeds]
            ax.scatter(xs, ys, color=line.get_color(), s=10, alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("label fraction")
        ax.legend(fontsize=7)
    else:
        names = [", ".join(f"{Path(str(s[k])).name}" for k in keys) for s in summary]
        means = [s.get(f"{metric}_mean", math.nan) for s in summary]
        ax.bar(range(len(summary)), means, yerr=[s.get(f"{metric}_ci95", 0.0) for s in summary], capsize=3, alpha=0.7)
        for i, s in enumerate(summary):
            seeds = [r[metric] for r in rows if all(r[k] == s[k] for k in keys) and metric in r]
            ax.scatter([i] * len(seeds), seeds, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(summary)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"test {metric} (mean, 95% CI, seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    prog = program("scan", "twinray.train.scan")
    parser = OneLineParser(
        prog=prog,
        description=__doc__,
        epilog=examples(prog, "configs/scan-fractions.yaml --dry-run", "configs/scan-fractions.yaml --out runs/scan"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="the scan's YAML file (twinray configs lists the shipped ones)")
    parser.add_argument("--out", type=Path, default=None, help="the scan's folder of runs (default: the YAML's out)")
    parser.add_argument("--dry-run", action="store_true", help="check the file, list the runs and stop")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.out is not None:
        cfg["out"] = str(args.out)
    runs = plan(cfg)
    check_inputs(cfg, runs, args.config)
    out = Path(cfg["out"])
    done = sum(finished(r) for r in runs)
    print(f"scan: {len(runs)} runs, {done} already finished, in {out}")
    for k, run in enumerate(runs, 1):
        if args.dry_run or finished(run):
            print(f"[{k}/{len(runs)}] {'skip' if finished(run) else 'plan'} {run['kind']} {run['dir']}")
            continue
        print(f"[{k}/{len(runs)}] {run['kind']} {run['dir']}", flush=True)
        execute(run)
    if args.dry_run:
        return 0
    keys = list(cfg["grid"]) + (["mode"] if "pretrain" in cfg else [])
    rows = collect(runs)
    summary = summarise(rows, keys)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "runs.csv", rows)
    write_csv(out / "summary.csv", summary)
    metric = cfg.get("metric") or ("accuracy" if rows and "accuracy" in rows[0] else "mean_auroc")
    png = draw(rows, summary, keys, metric, out / "scan.png")
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.csv'}, {png}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="scan", errors=(ConfigError,))
