"""Layout knowledge of CheXpert (Stanford ML Group): CheXpert-v1.0-small and the full CheXpert-v1.0.

    CheXpert-v1.0-small/
      train.csv  valid.csv
      train/patient00001/study1/view1_frontal.jpg
      valid/patient64541/study1/view1_frontal.jpg

Each CSV `Path` starts with the top folder's name (CheXpert-v1.0-small/train/...), so it is resolved against
the folder we are given, whatever that folder is called. Label cells are 1.0, 0.0, -1.0 (uncertain) or blank
(not mentioned), kept as 1, 0, -1 and null. valid.csv becomes `test`; train.csv is split by patient.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from twinray.prep.build import Plan, Record
from twinray.prep.splits import assign_splits, parse_split

from twinray.cli import InputError

DATASET = "chexpert"
LABELS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS]
VIEWS = ("frontal", "all")
LABEL_CODES = {"": None, "1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1}
PATIENT = re.compile(r"patient(\d+)")


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(f"{path}: missing (CheXpert ships train.csv and valid.csv beside train/ and valid/)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def resolve(src: Path, csv_path: str) -> tuple[Path, str]:
    """CSV Path -> (file, path relative to src). The first component is the dataset folder's own name."""
    parts = Path(csv_path).parts
    if len(parts) < 2:
        raise ValueError(f"Path {csv_path!r} has no folder part")
    relative = Path(*parts[1:])
    return src / relative, relative.as_posix()


def row_meta(row: dict) -> dict:
    """The sample JSON fields of one CSV row; raises ValueError on a label code CheXpert does not use."""
    labels = {}
    for name in LABELS:
        cell = row[name].strip()
        if cell not in LABEL_CODES:
            raise ValueError(f"bad label {cell!r} in column {name!r}")
        labels[name] = LABEL_CODES[cell]
    match = PATIENT.search(row["Path"])
    study = next((p for p in Path(row["Path"]).parts if p.startswith("study")), None)
    age = row["Age"].strip()
    return {
        "labels": labels,
        "patient": f"patient{match.group(1)}" if match else None,
        "study": study,
        "view": row["Frontal/Lateral"].strip() or None,
        "ap_pa": row["AP/PA"].strip() or None,
        "sex": row["Sex"].strip() or None,
        "age": int(float(age)) if age and float(age) > 0 else None,  # 0 means unknown
    }


def plan(src: str | Path, views: str = "frontal", split: str = "90/10", seed: int = 0) -> Plan:
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: no such folder (expected CheXpert-v1.0-small or CheXpert-v1.0)")
    if views not in VIEWS:
        raise InputError(f"--views {views!r} is not one of {', '.join(VIEWS)}")
    fractions = parse_split(split, ("train", "val"))

    records, skipped, train_records = [], [], []
    for csv_name, split_name in (("train.csv", "train"), ("valid.csv", "test")):
        for line, row in enumerate(read_csv(src / csv_name), start=2):
            if views == "frontal" and row["Frontal/Lateral"].strip() != "Frontal":
                continue
            try:
                path, source = resolve(src, row["Path"])
                meta = row_meta(row)
            except ValueError as e:
                skipped.append({"source": f"{csv_name}:{line}", "reason": str(e)})
                continue
            record = Record(path, source, split_name, meta)
            records.append(record)
            if split_name == "train":
                train_records.append(record)
    if not records:
        raise InputError(f"{src}: train.csv and valid.csv list no usable images")

    # Patients never span train and val: the patient is the unit of the split.
    groups = [r.meta["patient"] or r.source for r in train_records]
    for record, assigned in zip(train_records, assign_splits([0] * len(groups), fractions, seed, groups)):
        record.split = assigned
    args = {"src": str(src), "views": views, "split": split}
    return Plan(DATASET, "multilabel", list(LABELS), records, args, skipped)
