"""Layout knowledge of the COVID-19 Radiography Database (Kaggle: tawsifurrahman/covid19-radiography-database).

    COVID-19_Radiography_Dataset/
      COVID/images/COVID-1.png ...           COVID/masks/...          (older copies: PNGs in COVID/ itself)
      Lung_Opacity/images/Lung_Opacity-1.png ...
      Normal/images/Normal-1.png ...
      Viral Pneumonia/images/Viral Pneumonia-1.png ...
      COVID.metadata.xlsx ...                Sheet1: FILE NAME, FORMAT, SIZE, URL

`masks/` holds lung masks, not training images, and is never read. The xlsx gives each image's source URL,
with `FILE NAME` upper-cased in Normal (NORMAL-1 for Normal-1.png).
"""

from __future__ import annotations

import re
from pathlib import Path

from twinray.prep.build import Plan, Record
from twinray.prep.images import RASTER_SUFFIXES
from twinray.prep.splits import assign_splits, parse_split

from twinray.cli import InputError

DATASET = "covid19-radiography"
FOLDER_NAME = "COVID-19_Radiography_Dataset"
# The study's order: ImageFolder's alphabetical order of the folder names.
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
METADATA_COLUMNS = ("FILE NAME", "FORMAT", "SIZE", "URL")
UNKNOWN_ORIGIN = "unknown"


def natural_key(name: str) -> list:
    """'COVID-10.png' after 'COVID-9.png'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def image_folder(class_dir: Path) -> Path:
    images = class_dir / "images"
    return images if images.is_dir() else class_dir


def read_origins(xlsx: Path) -> dict[str, str]:
    """Upper-cased FILE NAME -> URL. A missing xlsx gives no origins; a malformed one is an error."""
    if not xlsx.is_file():
        return {}
    from openpyxl import load_workbook

    try:
        book = load_workbook(xlsx, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises zipfile, KeyError and its own errors for broken files
        raise InputError(f"{xlsx}: unreadable metadata workbook ({type(e).__name__}: {e})") from None
    sheet = book["Sheet1"] if "Sheet1" in book.sheetnames else book.worksheets[0]
    rows = sheet.iter_rows(values_only=True)
    header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
    missing = [c for c in ("FILE NAME", "URL") if c not in header]
    if missing:
        raise InputError(f"{xlsx}: metadata lacks column(s) {', '.join(missing)} (found: {', '.join(header)})")
    name_col, url_col = header.index("FILE NAME"), header.index("URL")
    origins = {}
    for row in rows:
        if row and row[name_col]:
            origins[str(row[name_col]).strip().upper()] = str(row[url_col] or UNKNOWN_ORIGIN).strip()
    book.close()
    return origins


def plan(src: str | Path, split: str = "80/10/10", seed: int = 0) -> Plan:
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: no such folder (expected the {FOLDER_NAME} folder)")
    missing = [c for c in CLASSES if not (src / c).is_dir()]
    if missing:
        raise InputError(f"{src}: not the {FOLDER_NAME} layout, missing class folder(s): {', '.join(missing)}")
    fractions = parse_split(split)

    records, skipped = [], []
    for label, name in enumerate(CLASSES):
        origins = read_origins(src / f"{name}.metadata.xlsx")
        folder = image_folder(src / name)
        for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
            if not path.is_file() or path.name.startswith("."):
                continue
            source = path.relative_to(src).as_posix()
            if path.suffix.lower() not in RASTER_SUFFIXES:
                skipped.append({"source": source, "reason": f"not an image file ({path.suffix or 'no suffix'})"})
                continue
            origin = origins.get(path.stem.upper(), UNKNOWN_ORIGIN)
            records.append(Record(path, source, "", {"label": label, "class": name, "origin": origin}))
    if not records:
        raise InputError(f"{src}: the class folders hold no images")

    labels = [r.meta["label"] for r in records]
    origins = [r.meta["origin"] for r in records]
    for record, assigned in zip(records, assign_splits(labels, fractions, seed, substrata=origins)):
        record.split = assigned
    return Plan(DATASET, "multiclass", list(CLASSES), records, {"src": str(src), "split": split}, skipped)
