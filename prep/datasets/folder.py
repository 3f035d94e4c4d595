"""A user's own X-rays: labels from class sub-folders, or from a CSV with path and label columns.

    SRC/<class>/**/*.{png,jpg,jpeg,bmp,tif,tiff,dcm}        (any `masks/` folder is ignored)
    or  --csv FILE  with columns path,label[,patient]       (paths relative to SRC)

`scan_tree` is the walk and the file rules; `prep images` (datasets/unlabeled.py) runs the same one on a tree
without labels.

Class folders are walked through symbolic links; a link back to an ancestor is cut, and a file reached twice is
one sample. The CSV may have a BOM and CRLF line endings, and Windows paths (backslashes). A path listed twice is
one sample; listed twice with different labels (or patients) it is an error naming the path.
With a patient column, a patient's images never span two splits.

A label cell that is empty or a usual spelling of a missing value (`inputs.MISSING_VALUES`: NA, N/A, nan, None,
null, ?, ...) is missing: its row is skipped by line, never a class; such a patient cell is no patient. Labels are
stripped of surrounding blanks and put in Unicode NFC; two labels, or class folders, that still read as one value
('1' and '1.0', 'Normal' and 'NORMAL', 'Viral Pneumonia' with one blank or two) are an error naming both spellings.
File and folder names that are not UTF-8 are packed, with the bytes that are not escaped in the manifest
(`caf\\xe9.png`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from twinray.cli import InputError
from twinray.prep.build import Plan, Record
from twinray.prep.datasets.inputs import (
    check_spellings,
    file_id,
    label_value,
    merge_repeats,
    normalize_path,
    printable_name,
    read_table,
    walk_files,
)
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


def is_image_file(path: Path) -> bool:
    """Whether prep reads `path` as an image: by a supported suffix, or by DICOM content (PACS exports carry none)."""
    return path.suffix.lower() in SUPPORTED_SUFFIXES or is_dicom_file(path)


def scan_tree(
    root: Path, base: Path, seen_folders: Sequence[Path] = ()
) -> tuple[list[tuple[Path, str]], list[dict], int]:
    """The image files under `root` at any depth, for `prep folder` (each class folder) and `prep images` (the whole
    tree): one walk and one set of rules for both.

    `inputs.walk_files` walks (symbolic links followed, loops cut, a file reached twice listed once, names starting
    with "." and `masks/` folders passed over, `seen_folders` never entered). Returns ([(path, source)] of the
    files `is_image_file` accepts, `source` relative to `base` with non-UTF-8 bytes escaped (`printable_name`);
    skip entries {"source", "reason"} for the other files and for folders that cannot be read; how many repeated
    files were dropped)."""
    files, unreadable, repeats = walk_files(root, IGNORED_FOLDERS, seen_folders=seen_folders)
    prefix = root.relative_to(base).as_posix()
    prefix = "" if prefix == "." else printable_name(prefix) + "/"
    skipped = [{**s, "source": prefix + s["source"]} for s in unreadable]
    found = []
    for path in files:
        source = printable_name(path.relative_to(base).as_posix())
        if is_image_file(path):
            found.append((path, source))
        else:
            skipped.append({"source": source, "reason": f"not an image file ({path.suffix or 'no suffix'})"})
    return found, skipped, repeats


def _from_subfolders(src: Path) -> tuple[list[Item], list[dict], list[str]]:
    entries = sorted(p for p in src.iterdir() if not p.name.startswith("."))
    class_dirs = [d for d in entries if d.is_dir() and d.name not in IGNORED_FOLDERS]
    if not class_dirs:
        raise InputError(
            f"{src}: no class sub-folders; put images in <class>/ folders or give --csv, or pack them without "
            f"labels: prep images --src {src}"
        )
    # An image beside the class folders has no class: said, not dropped. Other files there (a README) are not inputs.
    loose = [p for p in entries if not p.is_dir() and is_image_file(p)]
    reason = "image outside the class sub-folders (no class)"
    skipped = [{"source": printable_name(p.name), "reason": reason} for p in loose]
    items, repeats = [], 0
    for class_dir in class_dirs:
        found, unreadable, repeated = scan_tree(class_dir, src, seen_folders=[src, *class_dirs])
        skipped += unreadable
        repeats += repeated
        label = unicodedata.normalize("NFC", printable_name(class_dir.name))
        items += [Item(path, source, label, None, source) for path, source in found]
    check_spellings(((item.label, item.source.split("/")[0] + "/") for item in items), f"{src}: class folders")
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
    table = printable_name(csv_path.name)
    for line, row in rows:
        where = f"{table}:{line}"
        relative = normalize_path(row[path_col])
        label = label_value(row[label_col])
        if not relative:
            skipped.append({"source": where, "reason": f"empty {path_col!r}"})
            continue
        if label is None:  # empty, or NA, N/A, nan, None, ...: a missing label, never a class
            cell = row[label_col].strip()
            reason = f"missing {label_col!r} ({cell!r})" if cell else f"empty {label_col!r}"
            skipped.append({"source": where, "reason": reason})
            continue
        patient = label_value(row[patient_col]) if patient_col else None
        path = src / relative  # an absolute path stays absolute
        source = path.relative_to(src).as_posix() if path.is_relative_to(src) else relative
        items.append(Item(path, source, label, patient, where))
    check_spellings(((item.label, item.where) for item in items), f"{csv_path}: column {label_col!r}")
    items, repeats = merge_repeats(
        items,
        key=lambda item: item.source,
        value=lambda item: {"label": item.label, "patient": item.patient},
        where=lambda item: item.where,
        conflict="listed twice with different values",
    )
    notes = [f"{repeats} repeated row(s) of {table} merged (same path and label)"] if repeats else []
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
    args = {"src": printable_name(str(src)), "csv": printable_name(str(csv_file)) if csv_file else None, "split": split}
    return Plan(
        printable_name(name or src.name or DATASET), "multiclass", classes, records, args, skipped, scan_notes=notes
    )
