"""A user's own X-rays: labels from class sub-folders, or from a CSV with path and label columns.

    SRC/<class>/**/*.{png,jpg,jpeg,bmp,tif,tiff,dcm}        (any `masks/` folder is ignored)
    or  --csv FILE  with columns path,label[,patient]       (paths relative to SRC)

Class folders are walked through symbolic links; a link back to an ancestor is cut, and a file reached twice is
one sample. The CSV may have a BOM and CRLF line endings, and Windows paths (backslashes). A path listed twice is
one sample; listed twice with different labels (or patients) it is an error naming the path.
With a patient column, a patient's images never span two splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twinray.cli import InputError
from twinray.prep.build import Plan, Record
from twinray.prep.datasets.inputs import file_id, merge_repeats, normalize_path, read_table, walk_files
from twinray.prep.dicom import is_dicom_file
from twinray.prep.images import SUPPORTED_SUFFIXES
from twinray.prep.splits import assign_splits, parse_split

DATASET = "folder"
IGNORED_FOLDERS = {"masks"}


@dataclass
class Item:
    """One labelled file as the scan or the CSV names it; `where` is the path or CSV:LINE, for messages."""

    path: Path
    source: str
    label: str
    patient: str | None
    where: str


def _from_subfolders(src: Path) -> tuple[list[Item], list[dict], list[str]]:
    entries = sorted(p for p in src.iterdir() if not p.name.startswith("."))
    class_dirs = [d for d in entries if d.is_dir() and d.name not in IGNORED_FOLDERS]
    if not class_dirs:
        raise InputError(f"{src}: no class sub-folders; put images in <class>/ folders or give --csv")
    # An image beside the class folders has no class: said, not dropped. Other files there (a README) are not inputs.
    loose = [p for p in entries if not p.is_dir() and (p.suffix.lower() in SUPPORTED_SUFFIXES or is_dicom_file(p))]
    skipped = [{"source": p.name, "reason": "image outside the class sub-folders (no class)"} for p in loose]
    items, repeats = [], 0
    for class_dir in class_dirs:
        files, unreadable, repeated = walk_files(class_dir, IGNORED_FOLDERS, seen_folders=[src, *class_dirs])
        skipped += [{**s, "source": f"{class_dir.name}/{s['source']}"} for s in unreadable]
        repeats += repeated
        for path in files:
            source = path.relative_to(src).as_posix()
            if path.suffix.lower() in SUPPORTED_SUFFIXES or is_dicom_file(path):  # PACS exports: no suffix
                items.append(Item(path, source, class_dir.name, None, source))
            else:
                reason = f"not an image file ({path.suffix or 'no suffix'})"
                skipped.append({"source": source, "reason": reason})
    identity = {id(item): file_id(item.path) for item in items}
    merge_repeats(
        items,
        key=lambda item: identity[id(item)],
        value=lambda item: {"class": item.label},
        where=lambda item: item.where,
        conflict="is one file in two class folders",
        name=lambda item: item.source,
    )
    notes = [f"{repeats} file(s) reached twice through links, packed once"] if repeats else []
    return items, skipped, notes


def _from_csv(src: Path, csv_path: Path, path_col: str, label_col: str, patient_col: str | None):
    needed = [c for c in (path_col, label_col, patient_col) if c]
    _, rows, skipped = read_table(csv_path, needed)
    items = []
    for line, row in rows:
        where = f"{csv_path.name}:{line}"
        relative = normalize_path(row[path_col])
        label = row[label_col].strip()
        if not relative or not label:
            empty = label_col if relative else path_col
            skipped.append({"source": where, "reason": f"empty {empty!r}"})
            continue
        patient = (row[patient_col].strip() or None) if patient_col else None
        path = src / relative  # an absolute path stays absolute
        source = path.relative_to(src).as_posix() if path.is_relative_to(src) else relative
        items.append(Item(path, source, label, patient, where))
    items, repeats = merge_repeats(
        items,
        key=lambda item: item.source,
        value=lambda item: {"label": item.label, "patient": item.patient},
        where=lambda item: item.where,
        conflict="listed twice with different values",
    )
    notes = [f"{repeats} repeated row(s) of {csv_path.name} merged (same path and label)"] if repeats else []
    return items, skipped, notes


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
        items, skipped, notes = _from_csv(src, Path(csv_file), path_col, label_col, patient_col)
    else:
        items, skipped, notes = _from_subfolders(src)
    if not items:
        raise InputError(f"{src}: no images found")

    classes = sorted({item.label for item in items})
    records = []
    for item in items:
        meta = {"label": classes.index(item.label), "class": item.label}
        if item.patient is not None:
            meta["patient"] = item.patient
        records.append(Record(item.path, item.source, "", meta))
    strata = [r.meta["label"] for r in records]
    groups = [r.meta.get("patient") for r in records]
    for record, assigned in zip(records, assign_splits(strata, fractions, seed, groups)):
        record.split = assigned
    args = {"src": str(src), "csv": str(csv_file) if csv_file else None, "split": split}
    return Plan(name or src.name or DATASET, "multiclass", classes, records, args, skipped, scan_notes=notes)
