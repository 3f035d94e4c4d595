"""The real-data label-efficiency study from one YAML file: does Barlow Twins pretraining pay on real X-rays?

    python train/study_real.py configs/study-real.yaml [--profile auto|cpu|gpu|quick] [--raw DIR]
    make study-real [STUDY_PROFILE=gpu] [REAL_CXR=DIR]

Steps, each skipped when its output is already complete (so a re-run resumes and trains nothing twice):
1. the CSV (prep/real_cxr.py): one row per image with label and patient id -> WORK/labels.csv;
2. `prep folder --csv ... --patient-col patient`: no patient spans two splits -> WORK/packed-<hash of CSV and args>;
3. a train/scan.py pretraining sweep: per seed, one Barlow Twins pretraining, then `modes` (linear probe, full
   fine-tune) at each label fraction -> WORK/<profile>/barlow;
4. a train/scan.py grid from random init, same fractions, modes and seeds -> WORK/<profile>/random;
5. `twinray audit --protocol held-out` (train/audit.py): how far image statistics, the border or geometry alone
   separate the classes;
6. the report in RESULTS/<profile>/: runs.csv (one row per fine-tune), summary.csv (mean and 95% t-interval over
   seeds per init x mode x fraction), table.md, study.png, shortcuts.json, timings.json (wall and CPU seconds per
   step) and configs/ (the resolved study, both scan YAMLs, each pretraining's config.json, each finetune's config).

The YAML's keys: raw, work, results, patients_per_class, prep {split, seed, size}, seeds, fractions, modes,
source_class, pretrain and finetune (flags for every run), profile (the default) and profiles {name: {pretrain,
finetune, seeds, fractions, modes}}, merged over the top level. `pretrain: {data: DIR}` pretrains on another packed
dataset (an unlabeled one too) and fine-tunes on the real-cxr pack, with kNN on the pack's classes during it.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import yaml

from twinray.atomic import write_csv, write_json
from twinray.cli import InputError, OneLineParser, run_cli, say_error
from twinray.config import check_fields, read_mapping
from twinray.prep import real_cxr
from twinray.prep.cli import main as prep_main
from twinray.prep.format import SPLITS
from twinray.prep.open_dataset import open_dataset
from twinray.train import audit, scan, shortcuts
from twinray.usage import examples, program

KEYS = {"raw", "work", "results", "labels", "name", "patients_per_class", "prep", "seeds", "fractions", "modes",
        "source_class", "floor", "pretrain", "finetune", "profile", "profiles"}  # fmt: skip
PROFILE_KEYS = {"prep", "pretrain", "finetune", "seeds", "fractions", "modes"}
MERGED = ("prep", "pretrain", "finetune")  # a profile's section is merged over the top level's
METRICS = ("balanced_accuracy", "auroc", "source_class_auroc", "rest_balanced_accuracy", "accuracy", "macro_f1")
INITS = ("barlow", "random")  # then the floor probes (`floor`), in the YAML's order
# What the random-init arm takes from the `pretrain` section, so that both arms train the same network.
ARCHITECTURE = ("backbone", "channels", "output_stride")
SHOWN = ("balanced_accuracy", "auroc", "source_class_auroc", "rest_balanced_accuracy")  # the table's columns


def load(path: Path, profile: str | None = None) -> dict:
    """The study config with its profile applied: top-level keys, then the profile's (pretrain/finetune merged)."""
    cfg = read_mapping(path, "study")
    check_fields(cfg, KEYS, str(path), what="key")
    profiles = cfg.get("profiles") or {}
    name = profile or cfg.get("profile") or "auto"
    if name == "auto":
        import torch

        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name not in profiles:
        raise InputError(f"{path}: no profile {name!r} (profiles: {', '.join(profiles) or 'none'})")
    chosen = profiles[name] or {}
    check_fields(chosen, PROFILE_KEYS, f"{path}: profile {name!r}", what="key")
    out = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ("profiles", "profile")}
    for key, value in chosen.items():
        out[key] = {**(out.get(key) or {}), **value} if key in MERGED else value
    out["profile"] = name
    for key, default in (
        ("seeds", [0]),
        ("modes", ["linear", "full"]),
        ("source_class", None),
        ("prep", {}),
        ("floor", []),
        ("name", "real-cxr"),
        ("labels", None),
    ):
        out.setdefault(key, default)
    for key in ("raw", "work", "results", "fractions"):
        if key not in out:
            raise InputError(f"{path}: missing {key!r}")
    return out


class Clock:
    """Wall and CPU seconds (this process and its children, user + system) per step, saved to `path` after every
    step (a run that stops part-way keeps what it measured). The file keeps the last 20 invocations."""

    NOTE = ("wall_s and cpu_s (user + system seconds of the study's process and its children) per step and "
            "invocation; a step whose outputs were already finished takes ~0")  # fmt: skip

    def __init__(self, path: Path, command: str):
        self.path = path
        try:
            self.earlier = json.loads(path.read_text())["invocations"][-19:]
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or not ours: start afresh
            self.earlier = []
        self.this = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "cpus": len(os.sched_getaffinity(0)), "steps": {}}  # fmt: skip

    @staticmethod
    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def time(self, name: str, fn, *args):
        wall, cpu = time.perf_counter(), self._cpu()
        try:
            return fn(*args)
        except BaseException:
            self.this["steps"][name] = {"failed": True}
            raise
        finally:
            self.this["steps"].setdefault(name, {}).update(
                wall_s=round(time.perf_counter() - wall, 1), cpu_s=round(self._cpu() - cpu, 1)
            )
            write_json(self.path, {"note": self.NOTE, "invocations": [*self.earlier, self.this]})


def make_csv(cfg: dict) -> Path:
    """WORK/labels.csv: the dataset's own CSV (`labels`, relative to `raw`; columns path, label and patient, as
    kermany-cxr's labels.csv), or for real-cxr the one prep/real_cxr.py builds; `patients_per_class` keeps the
    first N patients of each label (sorted by id) with all their images."""
    out = Path(cfg["work"]) / "labels.csv"
    if cfg["labels"] is None:
        rows = real_cxr.build_rows(cfg["raw"], cfg.get("patients_per_class"))
        return real_cxr.write_csv(rows, out)
    source = Path(cfg["raw"]) / cfg["labels"]
    try:
        with open(source, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{source}: cannot read the labels CSV ({e})") from None
    missing = [c for c in ("path", "label", "patient") if c not in fields]
    if missing:
        raise InputError(f"{source}: no column {', '.join(missing)} (a study's labels CSV has path, label, patient)")
    if cfg.get("patients_per_class") is not None:
        rows = real_cxr.keep_patients(rows, int(cfg["patients_per_class"]))
    return write_csv(out, sorted(rows, key=lambda r: r["path"]), fields)


def pack(cfg: dict, labels: Path) -> Path:
    """`prep folder` on the CSV; the folder's name carries a hash of the CSV and the prep arguments, so a changed
    CSV or split never reuses a stale pack."""
    prep = {"split": "70/15/15", "seed": 0, "size": 256, **cfg["prep"]}
    digest = hashlib.sha256(labels.read_bytes() + json.dumps(prep, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(cfg["work"]) / f"packed-{digest}"
    argv = ["folder", "--src", str(cfg["raw"]), "--csv", str(labels), "--path-col", "path", "--label-col", "label",
            "--patient-col", "patient", "--name", str(cfg["name"]), "--out", str(out), "--split", str(prep["split"]),
            "--seed", str(prep["seed"]), "--size", str(prep["size"])]  # fmt: skip
    if prep_main(argv) != 0:
        raise InputError(f"prep folder failed for {labels}")
    return out


def scan_configs(cfg: dict, packed: Path) -> dict[str, dict]:
    """The two train/scan.py configs: the pretraining sweep (Barlow) and the random-init grid. A `pretrain` section
    with its own `data` pretrains on that dataset (labelled or not) and fine-tunes on `packed`, as the study's table 8
    did (CheXpert, then COVID); its kNN and probe then watch `packed` (`eval_data`, unless the section names one).
    The random-init grid builds the network the pretraining section names (ARCHITECTURE: backbone, channels,
    output stride), as the Barlow arm's fine-tunes do from the pretrained run."""
    work = Path(cfg["work"]) / cfg["profile"]
    finetune = dict(cfg.get("finetune") or {})
    pretrain = dict(cfg.get("pretrain") or {})
    if "data" in pretrain:  # pretraining on another dataset: its kNN and probe watch this one's classes
        pretrain.setdefault("eval_data", str(packed))
    barlow = {
        "data": str(packed), "out": str(work / "barlow"), "seeds": list(cfg["seeds"]),
        "pretrain": pretrain, "finetune": finetune,
        "grid": {"fraction": list(cfg["fractions"])}, "then": list(cfg["modes"]), "metric": "balanced_accuracy",
    }  # fmt: skip
    same_network = {**finetune, **{k: pretrain[k] for k in ARCHITECTURE if k in pretrain}}
    random = {
        "data": str(packed), "out": str(work / "random"), "seeds": list(cfg["seeds"]), "finetune": same_network,
        "grid": {"init": ["random"], "mode": list(cfg["modes"]), "fraction": list(cfg["fractions"])},
        "metric": "balanced_accuracy",
    }  # fmt: skip
    return {"barlow": barlow, "random": random}


def run_scan(path: Path) -> None:
    if scan.main([str(path)]) != 0:
        raise InputError(f"the scan {path} failed (its error is above)")


def collect(cfg: dict, scans: dict[str, dict]) -> list[dict]:
    """One row per finished fine-tune: init, mode, fraction, seed, train images, test metrics, its directory."""
    rows = []
    for init, scan_cfg in scans.items():
        for run in scan.plan(scan_cfg):
            results = run["dir"] / "results.json"
            if run["kind"] != "finetune" or not results.is_file():
                continue
            found = json.loads(results.read_text())
            test = found["test"]
            per_class = (test.get("per_class") or {}).get(cfg["source_class"]) or {}
            metrics = {**{m: test.get(m) for m in METRICS}, "source_class_auroc": per_class.get("auroc"),
                       "rest_balanced_accuracy": rest_recall(test["confusion"], cfg["source_class"])}  # fmt: skip
            rows.append({
                "init": init, "mode": run["cell"]["mode"], "fraction": float(run["cell"]["fraction"]),
                "seed": run["seed"], "train_images": found["train_samples"], "test_images": test["n"],
                **{k: v for k, v in metrics.items() if v is not None}, "dir": str(run["dir"]),
            })  # fmt: skip
    return rows


def floor_rows(cfg: dict, packed: Path, size: int) -> list[dict]:
    """The trivial floor per label fraction and seed, one row each like collect's: for each probe named in `floor`
    (train/shortcuts.py's `thumbnail`, say), logistic regression fitted on exactly the train images each fine-tune
    of that fraction and seed saw, its L2 strength picked on val, scored on test (shortcuts.fraction_floor). Its
    mode is `linear`: it is a linear probe, of features that need no training."""
    rows = []
    for probe in cfg["floor"]:
        for row in shortcuts.fraction_floor(packed, size, list(cfg["fractions"]), list(cfg["seeds"]), probe,
                                            cfg["source_class"]):  # fmt: skip
            rows.append({"init": probe, "mode": "linear", **{k: v for k, v in row.items() if k != "l2"},
                         "dir": ""})  # fmt: skip
    return rows


def rest_recall(confusion: dict, source_class: str | None) -> float | None:
    """Mean recall of the classes other than the single-source one, from test confusion counts (rows: true class):
    No_findings and Pneumonia both come from the NIH, so the source cannot separate them."""
    recalls = [row[k] / sum(row) for k, (name, row) in enumerate(zip(confusion["classes"], confusion["counts"]))
               if name != source_class and sum(row) > 0]  # fmt: skip
    return round(sum(recalls) / len(recalls), 6) if recalls and source_class is not None else None


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and 95% t-interval half-width over seeds, per init x mode x fraction (train/scan.py's)."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["init"], row["mode"], row["fraction"]), []).append(row)
    order = {name: k for k, name in enumerate(dict.fromkeys([*INITS, *(r["init"] for r in rows)]))}
    summary = []
    for (init, mode, fraction), members in sorted(cells.items(), key=lambda c: (c[0][1], c[0][2], order[c[0][0]])):
        entry = {"init": init, "mode": mode, "fraction": fraction, "seeds": len(members),
                 "train_images": round(sum(r["train_images"] for r in members) / len(members), 1)}  # fmt: skip
        summary.append(scan.mean_and_interval(entry, members, METRICS, digits=4))
    return summary


def _cell(entry: dict, metric: str) -> str:
    mean = entry.get(f"{metric}_mean")
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {entry[f'{metric}_ci95']:.3f}" if entry["seeds"] > 1 else f"{mean:.3f}"


def table(cfg: dict, summary: list[dict], report: dict, packed: Path, command: str) -> str:
    """The markdown report: the command, the data, the results table and the shortcut table."""
    data = open_dataset(packed)
    counts = ", ".join(f"{s} {data.manifest['splits'][s]}" for s in SPLITS)
    seeds = len(cfg["seeds"])
    spread = "mean ± 95% t-interval over" if seeds > 1 else "one seed, no interval:"
    source = cfg["source_class"]
    rest = " / ".join(c for c in data.classes if c != source)
    shown = SHOWN if source is not None else SHOWN[:2]
    heads = ["balanced accuracy", "macro AUROC", f"{source} AUROC", f"{rest} balanced accuracy"][: len(shown)]
    floors = ", ".join(f"`{name}`" for name in cfg["floor"])
    floor_line = (f" The {floors} rows are the trivial floor: logistic regression on that shortcut probe's features "
                  "(train/shortcuts.py), fitted on the same train images as each fraction's fine-tunes, its L2 "
                  "strength picked on val." if cfg["floor"] else "")  # fmt: skip
    lines = [
        f"Profile `{cfg['profile']}`: `{command}`",
        "",
        f"Data: {len(data)} images ({counts}), split by patient. Pretraining: {_flags(cfg['pretrain'])}. "
        f"Downstream: {_flags(cfg['finetune'])}. Test split, {spread} {seeds} seed{'s' if seeds > 1 else ''}."
        + floor_line,
        "",
        "| init | mode | label fraction | train images | " + " | ".join(heads) + " |",
        "|---|---|---|---|" + "---|" * len(heads),
    ]
    for s in summary:
        scores = " | ".join(_cell(s, m) for m in shown)
        lines.append(f"| {s['init']} | {s['mode']} | {s['fraction']:g} | {s['train_images']:g} | {scores} |")
    lines += [
        "",
        f"Source-shortcut check (`twinray audit --protocol held-out`; logistic regression on features that carry no "
        f"disease, eval view at {report['size']} px; 95% bootstrap over {report['test_patients']} test "
        "patients):",
        "",
        "| features | count | " + " | ".join(heads) + " |",
        "|---|---|" + "---|" * len(heads),
    ]
    for name, probe in report["probes"].items():
        t, ci = probe["test"], probe["test_ci95"]
        cells = [f"{t[m]:.3f} [{ci[m][0]:.3f}, {ci[m][1]:.3f}]" if m in ci else f"{t.get(m, 'n/a')}"
                 for m in shown]  # fmt: skip
        lines.append(f"| {name} | {probe['features']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _flags(options: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in options.items())


def draw(summary: list[dict], rows: list[dict], report: dict, modes: list[str], out: Path) -> Path:
    """One panel per mode: test balanced accuracy against label fraction (log x), Barlow and random init as lines
    with 95% bands and seeds as dots; the floor probes (`thumbnail`: rows with another init) as a grey line with its
    band in every panel, since they are what any model must beat; the shortcut probes as dashed horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "balanced_accuracy"
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), sharey=True, squeeze=False)
    colours = {"barlow": "tab:blue", "random": "tab:orange"}
    floors = [i for i in dict.fromkeys(s["init"] for s in summary) if i not in INITS]
    for ax, mode in zip(axes[0], modes):
        for init in (*INITS, *floors):
            floor = init in floors
            points = sorted((s["fraction"], s) for s in summary if s["init"] == init and (floor or s["mode"] == mode))
            if not points:
                continue
            x = [p for p, _ in points]
            mean = [s.get(f"{metric}_mean", math.nan) for _, s in points]
            ci = [s.get(f"{metric}_ci95", 0.0) for _, s in points]
            label = {"barlow": "Barlow Twins init", "random": "random init"}.get(init, f"floor: {init} probe")
            colour = colours.get(init, "dimgrey")
            ax.plot(x, mean, marker="o", color=colour, label=label, linestyle="-." if floor else "-")
            ax.fill_between(x, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)],
                            color=colour, alpha=0.15)  # fmt: skip
            seeds = [r for r in rows if r["init"] == init and (floor or r["mode"] == mode) and metric in r]
            ax.scatter([r["fraction"] for r in seeds], [r[metric] for r in seeds], color=colour, s=10)
        for name, style in (("statistics", ":"), ("all", "--")):
            if name in report["probes"]:
                value = report["probes"][name]["test"][metric]
                ax.axhline(value, color="grey", linestyle=style, label=f"shortcut probe: {name}")
        ax.axhline(1 / len(report["classes"]), color="lightgrey", linewidth=0.8, label="chance")
        ax.set_xscale("log")
        ax.set_xticks(
            sorted({s["fraction"] for s in summary}), [f"{f:g}" for f in sorted({s["fraction"] for s in summary})]
        )
        ax.set_xlabel("label fraction of the train split")
        ax.set_title("linear probe" if mode == "linear" else f"{mode} fine-tune")
    axes[0][0].set_ylabel("test balanced accuracy")
    axes[0][0].legend(fontsize=7, loc="lower right")  # the linear panel's lower right is empty
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def shortcut_report(path: Path, packed: Path, size: int, source_class: str | None) -> dict:
    """`twinray audit PACKED --protocol held-out`'s report (train/audit.py: scored on the models' test split),
    reused when `path` already holds one for this pack, size, class and protocol (one without is held-out's)."""
    try:
        found = json.loads(path.read_text())
        if (found["data"], found["size"], found["source_class"], found.get("protocol", "held-out")) == (
            str(packed), size, source_class, "held-out"):  # fmt: skip
            return found
    except (OSError, ValueError, KeyError, TypeError):
        pass
    report = audit.audit(packed, size, "held-out", source_class=source_class)
    write_json(path, report)
    return report


def save_configs(cfg: dict, scans: dict[str, dict], rows: list[dict], results: Path) -> None:
    folder = results / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))  # the scans' YAMLs are already here
    for seed in cfg["seeds"]:
        found = Path(scans["barlow"]["out"]) / "pretrain" / f"seed-{seed}" / "pretrain" / "config.json"
        if found.is_file():
            shutil.copyfile(found, folder / f"pretrain-seed-{seed}.json")
    lines = [
        json.dumps({"dir": r["dir"], **json.loads((Path(r["dir"]) / "results.json").read_text())["config"]})
        for r in rows
        if r["dir"]
    ]  # fmt: skip (the floor's rows are no run)
    (folder / "finetunes.jsonl").write_text("\n".join(lines) + "\n")


def study(cfg: dict, command: str) -> Path:
    work, results = Path(cfg["work"]), Path(cfg["results"]) / cfg["profile"]
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    clock = Clock(results / "timings.json", command)
    labels = clock.time("csv", make_csv, cfg)
    packed = clock.time("prep", pack, cfg, labels)
    scans = scan_configs(cfg, packed)
    (results / "configs").mkdir(exist_ok=True)
    for name, scan_cfg in scans.items():
        path = results / "configs" / f"scan-{name}.yaml"
        path.write_text(yaml.safe_dump(scan_cfg, sort_keys=False))
        clock.time(f"scan-{name}", run_scan, path)
    size = int((cfg.get("finetune") or {}).get("size", 224))
    report = clock.time("shortcuts", shortcut_report, results / "shortcuts.json", packed, size, cfg["source_class"])
    rows = collect(cfg, scans)
    if cfg["floor"]:
        rows += clock.time("floor", floor_rows, cfg, packed, size)
    summary = summarise(rows)
    write_csv(results / "runs.csv", rows)
    write_csv(results / "summary.csv", summary)
    (results / "table.md").write_text(table(cfg, summary, report, packed, command))
    draw(summary, rows, report, list(cfg["modes"]), results / "study.png")
    save_configs(cfg, scans, rows, results)
    return results


def main(argv: list[str] | None = None) -> int:
    prog = program("study-real", "twinray.train.study_real")
    epilog = examples(prog, "configs/study-real.yaml --profile quick", "configs/study-real.yaml --raw data/real-cxr")
    parser = OneLineParser(prog=prog, description=__doc__, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("config", type=Path, help="the study's YAML (configs/study-real.yaml)")
    parser.add_argument(
        "--profile",
        default=None,
        help="a profile of the YAML, or auto: gpu with CUDA, else cpu (default: the YAML's profile)",
    )
    parser.add_argument("--raw", type=Path, default=None, help="the real-cxr folder (default: the YAML's raw)")
    parser.add_argument(
        "--work", type=Path, default=None, help="the folder of intermediate outputs (default: the YAML's work)"
    )
    parser.add_argument("--results", type=Path, default=None, help="the report's folder (default: the YAML's results)")
    args = parser.parse_args(argv)
    command = " ".join(["python", "train/study_real.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        cfg = load(args.config, args.profile)
        for key in ("raw", "work", "results"):
            if getattr(args, key) is not None:
                cfg[key] = str(getattr(args, key))
        if not Path(cfg["raw"]).is_dir():
            raise InputError(
                f"{cfg['raw']}: no such folder (the study's data; give --raw, or REAL_CXR=... or "
                "KERMANY_CXR=... to make)"
            )
        results = study(cfg, command)
    except InputError as e:
        say_error("study_real", str(e))
        return 2
    print(f"wrote {results}: table.md, summary.csv, runs.csv, study.png, shortcuts.json, timings.json, configs/")
    return 0


if __name__ == "__main__":
    run_cli(main)
