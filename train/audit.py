"""`twinray audit DIR`: how far cues that carry no disease (grey-level statistics, the border, the image's shape,
the sample JSON's metadata such as origin, view or sex) predict the label of a packed dataset. One table, a JSON
report, and a verdict: the balanced accuracy a model must beat before its score says anything about disease.

    twinray audit DIR [--protocol cv|held-out] [--folds 5] [--size 96] [--source-class NAME] [--out audit.json]

Each probe is a logistic regression on one feature set (train/shortcuts.py lists them and fits them). By default
(`--protocol cv`) it is a patient-grouped, stratified k-fold cross-validation over every labelled image: no patient
is in the fold that scores it and the fold that trained it. `--protocol held-out` fits on train, picks the L2
strength on val and scores test, the images the models are scored on (the real-data study runs this one: its table
sits beside the models' test scores). The table gives balanced accuracy and macro AUROC with 95% percentile
bootstraps over the scored patients (per image where the sample JSON has no `patient`; the header says which).

The verdict reads the best probe: when its interval lies above chance (1 / classes), a model scoring below that
probe's balanced accuracy beats no shortcut; otherwise no probe found one. A class with fewer than MIN_GROUPS
patients among the scored images gets one line saying the figures may not mean anything. An unlabelled or
multilabel dataset, or one too small to score (docs/downstream.md, "Shortcut audit"), is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from twinray.atomic import write_json
from twinray.cli import InputError, OneLineParser, run_cli
from twinray.prep.open_dataset import open_dataset
from twinray.train import shortcuts
from twinray.usage import examples, program

OBVIOUS = ("label", "labels", "class", "split", "patient")  # sample JSON fields left out without a word
MIN_GROUPS = 10  # patients per class among the scored images below which the figures are too rough to read


def chance(classes: int) -> float:
    """Balanced accuracy of any classifier that ignores its input: 1 / classes (a class's recall is the share of
    images predicted as it, and the shares sum to one)."""
    return 1.0 / classes


def round_up(value: float) -> float:
    """`value` rounded up to 2 decimals, a threshold a reader can quote (0.848 -> 0.85, 0.85 -> 0.85)."""
    return math.ceil(round(value * 100, 6)) / 100


def too_small(report: dict) -> str | None:
    """One line naming each class with fewer than MIN_GROUPS groups (patients, or images) among the scored images,
    or None."""
    unit = "patients" if report["grouped_by"] == "patient" else "images"
    where = "the test split" if report["protocol"] == "held-out" else "the dataset"
    few = [f"{c} {v['groups']}" for c, v in report["scored"]["per_class"].items() if v["groups"] < MIN_GROUPS]
    if not few:
        return None
    return (f"too small to mean much: {where} has fewer than {MIN_GROUPS} {unit} in {', '.join(few)}; "
            f"the intervals are wide and a probe can look better or worse than it is")  # fmt: skip


def verdict(report: dict) -> str:
    """The plain reading of the best probe (highest balanced accuracy): a level to beat, or no shortcut found."""
    level = chance(len(report["classes"]))
    name, best = max(report["probes"].items(), key=lambda item: item[1]["test"]["balanced_accuracy"])
    score = best["test"]["balanced_accuracy"]
    low, high = best["test_ci95"].get("balanced_accuracy", (score, score))
    found = f"{name} reaches {score:.3f} balanced accuracy [{low:.3f}, {high:.3f}]; chance is {level:.2f}"
    if low > level:
        return f"a model scoring below {round_up(score):.2f} balanced accuracy here beats no shortcut ({found})"
    return f"no shortcut found: no probe's interval clears chance (the best, {found})"


def audit(root: str | Path, size: int = 96, protocol: str = "cv", folds: int = shortcuts.FOLDS,
          source_class: str | None = None, resamples: int = shortcuts.BOOTSTRAP, seed: int = 0) -> dict:  # fmt: skip
    """shortcuts.check's report plus "too_small" (a line or None) and "verdict" (a line). Raises InputError as
    shortcuts.check does."""
    report = shortcuts.check(root, size, source_class, resamples, protocol, folds, seed)
    report["too_small"] = too_small(report)
    report["verdict"] = verdict(report)
    return report


def table(report: dict) -> str:
    """The report as text: a header, one row per probe, the metadata fields left out, the too-small line, the
    verdict."""
    source = report["source_class"]
    scored = report["scored"]
    if report["grouped_by"] == "patient":
        grouping = f"grouped by patient ({scored['groups']} patients"
        grouping += f"; {report['without_patient']} images without one are their own group)" if (
            report["without_patient"]) else ")"  # fmt: skip
    else:
        grouping = "per image (the sample JSON has no patient)"
    how = f"{report['folds']}-fold cross-validation" if report["protocol"] == "cv" else "fit on train, scored on test"
    lines = [
        f"shortcut audit of {report['data']}: {', '.join(report['classes'])}; {how} over {scored['images']} images, "
        f"{grouping}; eval view {report['size']} px; 95% bootstrap intervals ({report['resamples']} resamples)",
        "",
    ]
    head = f"{'probe':<14}{'features':>9}  {'balanced accuracy':<22}  {'AUROC':<22}"
    if source is not None:
        head += f"  {source + ' AUROC':<22}"
    lines += [head, "-" * len(head)]
    metrics = ("balanced_accuracy", "auroc") + (("source_class_auroc",) if source is not None else ())
    for name, probe in report["probes"].items():
        cells = []
        for m in metrics:
            value, ci = probe["test"][m], probe["test_ci95"].get(m)
            cells.append("n/a" if value is None else f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        lines.append(f"{name:<14}{probe['features']:>9}  " + "  ".join(f"{c:<22}" for c in cells).rstrip())
    lines.append(f"chance: balanced accuracy {chance(len(report['classes'])):.3f}, AUROC 0.500")
    skipped = {k: v for k, v in report["metadata"]["skipped"].items() if k not in OBVIOUS}
    if skipped:
        lines.append("metadata not probed: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    if report["too_small"]:
        lines.append(report["too_small"])
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    prog = program("audit", "twinray.train.audit")
    parser = OneLineParser(
        prog=prog,
        description=__doc__,
        epilog=examples(
            prog,
            "data/packed/covid",
            "data/packed/covid --protocol held-out --out audit-covid.json",
            "data/packed/mine --folds 10 --source-class COVID-19",
        ),  # fmt: skip
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", type=Path, help="a packed multiclass dataset (prep's output)")
    parser.add_argument(
        "--protocol",
        choices=shortcuts.PROTOCOLS,
        default="cv",
        help="cv: patient-grouped k-fold over every image (default); held-out: train/val/test",
    )
    parser.add_argument("--folds", type=int, default=shortcuts.FOLDS, help="folds of --protocol cv (5)")
    parser.add_argument("--size", type=int, default=96, help="side of the eval view in px, as the models' (96)")
    parser.add_argument(
        "--source-class", default=None, help="a class from a single source: adds its one-vs-rest AUROC (none)"
    )
    parser.add_argument("--resamples", type=int, default=shortcuts.BOOTSTRAP, help="bootstrap resamples (1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and the bootstrap (0)")
    parser.add_argument("--out", type=Path, default=Path("audit.json"), help="the JSON report (audit.json)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)  # fmt: skip
    if args.size < 8:
        parser.error(f"--size {args.size} must be at least 8")
    if args.folds < 2:
        parser.error(f"--folds {args.folds} must be at least 2")
    if args.resamples < 100:
        parser.error(f"--resamples {args.resamples} must be at least 100")
    open_dataset(args.data)  # a missing or unpacked dataset is said first, before anything about --out
    if args.out.is_dir():
        raise InputError(f"--out {args.out} is a folder; the report is one JSON file: give its path (audit.json)")
    if args.out.exists() and not args.force:
        raise InputError(f"{args.out} exists; pass --force to replace it")
    try:  # --out's folder made before the probes run, not found missing after them
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {args.out}: cannot make its folder ({e.strerror or e})") from None
    report = audit(args.data, args.size, args.protocol, args.folds, args.source_class, args.resamples, args.seed)
    write_json(args.out, report)
    print(table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main, "audit")
