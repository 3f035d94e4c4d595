"""The real-data study's CSV, generated from the labels shipped in `../shared/data/real-cxr` (never copied by hand).

    python -m twinray.prep.real_cxr [--src ../shared/data/real-cxr] --out data/real-cxr/labels.csv
    python -m twinray.prep folder --src ../shared/data/real-cxr --csv data/real-cxr/labels.csv \\
        --patient-col patient --split 70/15/15 --out data/real-cxr/packed

It sits between the raw files and `prep folder`: it reads `nih-cxr14/labels.csv` (the NIH ChestX-ray14 rows, one
image per patient, in the folders No_findings and Pneumonia) and `mhh-covid19/data.csv` (243 COVID-19 images of 71
patients from Hannover Medical School) and writes one row per image:

    path       relative to --src (what `prep folder --src` resolves)
    label      No_findings | Pneumonia (the NIH folder) or COVID-19 (every MHH image)
    patient    nih-<Patient ID> or mhh-<patient_id>: the two sources' id spaces cannot collide
    source     nih-cxr14 | mhh-covid19 (one hospital per class for COVID-19: see train/shortcuts.py)
    view       AP or PA
    sex        F or M

Rows are sorted by path, so the same inputs give the same bytes. `--patients-per-class N` keeps the first N patients
of each class (by id, all of their images): the tests' shrunk study.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from twinray.atomic import write_csv as atomic_csv
from twinray.cli import InputError, OneLineParser, run_cli

DEFAULT_SRC = Path("../shared/data/real-cxr")
NIH_CSV = Path("nih-cxr14/labels.csv")
MHH_CSV = Path("mhh-covid19/data.csv")
NIH_CLASSES = ("No_findings", "Pneumonia")
COVID = "COVID-19"
FIELDS = ("path", "label", "patient", "source", "view", "sex")


def _read(path: Path, needed: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise InputError(f"{path}: not found (is --src the real-cxr folder?)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def nih_rows(src: Path) -> list[dict]:
    """NIH rows of the two study classes; the label is the folder (`folder_label`), not the text-mined findings."""
    rows = []
    for line, r in enumerate(_read(src / NIH_CSV, ("path", "folder_label", "Patient ID")), start=2):
        if r["folder_label"] not in NIH_CLASSES:
            raise InputError(f"{src / NIH_CSV}:{line}: folder_label {r['folder_label']!r} is not one of {NIH_CLASSES}")
        rows.append({
            "path": (NIH_CSV.parent / r["path"]).as_posix(),
            "label": r["folder_label"],
            "patient": f"nih-{int(r['Patient ID'])}",
            "source": "nih-cxr14",
            "view": r.get("View Position", "").upper(),
            "sex": r.get("Patient Gender", "").upper(),
        })  # fmt: skip
    return rows


def mhh_rows(src: Path) -> list[dict]:
    """Every MHH image: all are COVID-19 positive; the file is png/<image_id>.png."""
    rows = []
    for r in _read(src / MHH_CSV, ("patient_id", "image_id")):
        rows.append({
            "path": (MHH_CSV.parent / "png" / f"{r['image_id']}.png").as_posix(),
            "label": COVID,
            "patient": f"mhh-{r['patient_id']}",
            "source": "mhh-covid19",
            "view": r.get("projection", "").upper(),
            "sex": {"w": "F", "f": "F", "m": "M"}.get(r.get("sex", "").lower(), ""),
        })  # fmt: skip
    return rows


def keep_patients(rows: list[dict], per_class: int) -> list[dict]:
    """The first `per_class` patients of each label (sorted by id), with all of their images."""
    kept: dict[str, list[str]] = {}
    for patient, label in sorted({(r["patient"], r["label"]) for r in rows}):
        chosen = kept.setdefault(label, [])
        if len(chosen) < per_class:
            chosen.append(patient)
    keep = {p for chosen in kept.values() for p in chosen}
    return [r for r in rows if r["patient"] in keep]


def build_rows(src: str | Path = DEFAULT_SRC, patients_per_class: int | None = None) -> list[dict]:
    """The study's rows, sorted by path. Raises InputError when a listed image is missing or a CSV is malformed."""
    src = Path(src)
    rows = nih_rows(src) + mhh_rows(src)
    missing = [r["path"] for r in rows if not (src / r["path"]).is_file()]
    if missing:
        raise InputError(f"{src / missing[0]}: listed but not found ({len(missing)} missing in all)")
    if patients_per_class is not None:
        rows = keep_patients(rows, patients_per_class)
    return sorted(rows, key=lambda r: r["path"])


def write_csv(rows: list[dict], out: str | Path) -> Path:
    """The labels CSV (columns FIELDS), written atomically; its folder is made."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return atomic_csv(out, rows, FIELDS)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m twinray.prep.real_cxr", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"the real-cxr folder ({DEFAULT_SRC})")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--patients-per-class", type=int, default=None, help="keep only N patients per class")
    args = parser.parse_args(argv)
    if args.patients_per_class is not None and args.patients_per_class < 1:
        parser.error(f"--patients-per-class {args.patients_per_class} must be at least 1")
    rows = build_rows(args.src, args.patients_per_class)
    write_csv(rows, args.out)
    counts = {}
    for r in rows:
        counts.setdefault(r["label"], [0, set()])
        counts[r["label"]][0] += 1
        counts[r["label"]][1].add(r["patient"])
    text = ", ".join(f"{k} {n} images / {len(p)} patients" for k, (n, p) in sorted(counts.items()))
    print(f"wrote {args.out}: {text}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="real_cxr")
