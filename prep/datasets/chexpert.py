"""Layout knowledge of CheXpert (Stanford ML Group): CheXpert-v1.0-small and the full CheXpert-v1.0.

    CheXpert-v1.0-small/
      train.csv  valid.csv
      train/patient00001/study1/view1_frontal.jpg
      valid/patient64541/study1/view1_frontal.jpg

Each CSV `Path` starts with the top folder's name (CheXpert-v1.0-small/train/...), in copies made elsewhere
sometimes without it (train/patient00001/...) or with backslashes. Either way it is resolved against the folder
we are given from its train/ or valid/ folder on, whatever comes before. Label cells are 1.0, 0.0, -1.0
(uncertain) or blank (not mentioned), kept as 1, 0, -1 and null. valid.csv becomes `test`; train.csv is split by
patient into train and val. The CSVs may have a BOM and CRLF line endings. A path listed twice is one sample
(two rows that disagree are an error), and a split that comes out empty is an error, never published.
"""

from __future__ import annotations

import re
from pathlib import Path

from twinray.cli import InputError
from twinray.prep.build import Plan, Record
from twinray.prep.datasets.inputs import merge_repeats, normalize_path, read_table
from twinray.prep.splits import assign_splits, parse_split

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
# The CheXpert competition pathologies (Irvin et al. 2019), which fine-tuning picks by default.
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS]
VIEWS = ("frontal", "all")
LABEL_CODES = {"": None, "1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1}
PATIENT = re.compile(r"patient(\d+)")
SPLIT_FOLDERS = ("train", "valid", "test")  # test/: the later CheXpert test set has the same layout


def read_csv(path: Path) -> tuple[list[tuple[int, dict]], list[dict]]:
    """([(line, row)], rows skipped by line); InputError for a missing file or columns."""
    if not path.is_file():
        raise InputError(f"{path}: missing (CheXpert ships train.csv and valid.csv beside train/ and valid/)")
    _, rows, skipped = read_table(path, COLUMNS)
    return rows, skipped


def resolve(src: Path, csv_path: str) -> tuple[Path, str]:
    """CSV Path -> (file, path relative to src), from the split folder on: the one just before `patientNNNNN`,
    else the first train/, valid/ or test/. Raises ValueError when there is none."""
    parts = normalize_path(csv_path).split("/")
    splits = [i for i, part in enumerate(parts) if part in SPLIT_FOLDERS]
    before_patient = [i for i in splits if i + 1 < len(parts) and PATIENT.fullmatch(parts[i + 1])]
    if not splits:
        raise ValueError(f"Path {csv_path!r} has no {', '.join(f'{s}/' for s in SPLIT_FOLDERS)} folder")
    relative = "/".join(parts[(before_patient or splits)[0] :])
    return src / relative, relative


def row_meta(row: dict, source: str) -> dict:
    """The sample JSON fields of one CSV row (`source`: its resolved path); raises ValueError on a label code
    CheXpert does not use."""
    labels = {}
    for name in LABELS:
        cell = row[name].strip()
        if cell not in LABEL_CODES:
            raise ValueError(f"bad label {cell!r} in column {name!r}")
        labels[name] = LABEL_CODES[cell]
    match = PATIENT.search(source)
    study = next((p for p in source.split("/") if p.startswith("study")), None)
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

    entries, skipped, seen = [], [], {}
    for csv_name, split_name in (("train.csv", "train"), ("valid.csv", "test")):
        rows, bad = read_csv(src / csv_name)
        skipped += bad
        seen[csv_name] = {"rows": len(rows) + len(bad), "other views": 0, "unusable": list(bad)}
        for line, row in rows:
            if views == "frontal" and row["Frontal/Lateral"].strip() != "Frontal":
                seen[csv_name]["other views"] += 1
                continue
            where = f"{csv_name}:{line}"
            try:
                path, source = resolve(src, row["Path"])
                meta = row_meta(row, source)
            except ValueError as e:
                skipped.append({"source": where, "reason": str(e)})
                seen[csv_name]["unusable"].append(skipped[-1])
                continue
            entries.append((Record(path, source, split_name, meta), where))
    entries, repeats = merge_repeats(
        entries,
        key=lambda entry: entry[0].source,
        value=lambda entry: {"split": entry[0].split, **entry[0].meta},
        where=lambda entry: entry[1],
        conflict="listed twice with different values",
    )
    records = [record for record, _ in entries]
    for csv_name, split_name in (("train.csv", "train"), ("valid.csv", "test")):
        if not any(r.split == split_name for r in records):
            raise InputError(f"{src / csv_name}: gives the {split_name} split no images ({_why_none(seen[csv_name])})")

    # Patients never span train and val: the patient is the unit of the split.
    train_records = [r for r in records if r.split == "train"]
    groups = [r.meta["patient"] or r.source for r in train_records]
    for record, assigned in zip(train_records, assign_splits([0] * len(groups), fractions, seed, groups)):
        record.split = assigned
    args = {"src": str(src), "views": views, "split": split}
    notes = [f"{repeats} repeated row(s) of train.csv/valid.csv merged (same path and values)"] if repeats else []
    return Plan(DATASET, "multilabel", list(LABELS), records, args, skipped, scan_notes=notes)


def _why_none(seen: dict) -> str:
    """Why a CSV gave no images, for the error line: '2 row(s): 1 not frontal (...), 1 unusable (valid.csv:3: ...)'."""
    if not seen["rows"]:
        return "it lists no rows"
    parts = []
    if seen["other views"]:
        parts.append(f"{seen['other views']} not frontal (--views all keeps them)")
    if seen["unusable"]:
        first = seen["unusable"][0]
        parts.append(f"{len(seen['unusable'])} unusable (first: {first['source']}: {first['reason']})")
    return f"{seen['rows']} row(s): {', '.join(parts)}"
