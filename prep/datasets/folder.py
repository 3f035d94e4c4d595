"""A user's own X-rays: labels from class sub-folders, or from a CSV with path and label columns.

    SRC/<class>/**/*.{png,jpg,jpeg,bmp,tif,tiff,dcm}        (any `masks/` folder is ignored)
    or  --csv FILE  with columns path,label[,patient]       (paths relative to SRC)

With a patient column, a patient's images never span two splits.
"""

from __future__ import annotations

import csv
from pathlib import Path

from twinray.prep.build import Plan, Record
from twinray.prep.images import SUPPORTED_SUFFIXES
from twinray.prep.splits import assign_splits, parse_split

from twinray.cli import InputError

DATASET = "folder"
IGNORED_FOLDERS = {"masks"}


def _visible(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return not any(p.startswith(".") or p in IGNORED_FOLDERS for p in parts)


def _from_subfolders(src: Path) -> tuple[list[tuple[Path, str, None]], list[dict]]:
    class_dirs = sorted(d for d in src.iterdir() if d.is_dir() and _visible(d, src))
    if not class_dirs:
        raise InputError(f"{src}: no class sub-folders; put images in <class>/ folders or give --csv")
    items, skipped = [], []
    for class_dir in class_dirs:
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or not _visible(path, src):
                continue
            if path.suffix.lower() in SUPPORTED_SUFFIXES:
                items.append((path, class_dir.name, None))
            else:
                reason = f"not an image file ({path.suffix or 'no suffix'})"
                skipped.append({"source": path.relative_to(src).as_posix(), "reason": reason})
    return items, skipped


def _from_csv(src: Path, csv_path: Path, path_col: str, label_col: str, patient_col: str | None):
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such CSV file")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        needed = [c for c in (path_col, label_col, patient_col) if c]
        missing = [c for c in needed if c not in header]
        if missing:
            found = ", ".join(header) or "nothing"
            raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)} (found: {found})")
        rows = list(reader)
    items, skipped = [], []
    for line, row in enumerate(rows, start=2):
        label = (row[label_col] or "").strip()
        if not label:
            skipped.append({"source": f"{csv_path.name}:{line}", "reason": f"empty {label_col!r}"})
            continue
        patient = ((row[patient_col] or "").strip() or None) if patient_col else None
        items.append((src / row[path_col].strip(), label, patient))
    return items, skipped


def plan(
    src: str | Path,
    csv_file: str | Path | None = None,
    path_col: str = "path",
    label_col: str = "label",
    patient_col: str | None = None,
    split: str = "80/10/10",
    seed: int = 0,
    name: str | None = None,
) -> Plan:
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: no such folder")
    fractions = parse_split(split)
    if csv_file:
        items, skipped = _from_csv(src, Path(csv_file), path_col, label_col, patient_col)
    else:
        items, skipped = _from_subfolders(src)
    if not items:
        raise InputError(f"{src}: no images found")

    classes = sorted({label for _, label, _ in items})
    records = []
    for path, label, patient in items:
        source = path.relative_to(src).as_posix() if path.is_relative_to(src) else str(path)
        meta = {"label": classes.index(label), "class": label}
        if patient is not None:
            meta["patient"] = patient
        records.append(Record(path, source, "", meta))
    strata = [r.meta["label"] for r in records]
    groups = [r.meta.get("patient") for r in records]
    for record, assigned in zip(records, assign_splits(strata, fractions, seed, groups)):
        record.split = assigned
    args = {"src": str(src), "csv": str(csv_file) if csv_file else None, "split": split}
    return Plan(name or src.name or DATASET, "multiclass", classes, records, args, skipped)
