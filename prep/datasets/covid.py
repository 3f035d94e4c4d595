"""Layout knowledge of the COVID-19 Radiography Database (Kaggle: tawsifurrahman/covid19-radiography-database).

    COVID-19_Radiography_Dataset/
      COVID/images/COVID-1.png ...           COVID/masks/...          (older copies: PNGs in COVID/ itself)
      Lung_Opacity/images/Lung_Opacity-1.png ...
      Normal/images/Normal-1.png ...
      Viral Pneumonia/images/Viral Pneumonia-1.png ...
      COVID.metadata.xlsx ...                Sheet1: FILE NAME, FORMAT, SIZE, URL

`masks/` holds lung masks, not training images, and is never read. Class folders are walked through symbolic
links (a loop is cut, a file reached twice is one sample); a file name that is not UTF-8 is packed, its
bytes that are not escaped in the manifest (`caf\\xe9.png`). The xlsx gives each image's source URL; its
`FILE NAME` is matched whatever its case or extension (NORMAL-1, normal-1.PNG and Normal-1.png all name
Normal-1.png). Images left without a source URL are counted in the plan's notes, so the summary line says so.
"""

from __future__ import annotations

import re
from pathlib import Path

from twinray.cli import InputError
from twinray.prep.build import Plan, Record
from twinray.prep.datasets.inputs import file_id, merge_repeats, normalize_path, printable_name, walk_files
from twinray.prep.images import RASTER_SUFFIXES, SUPPORTED_SUFFIXES
from twinray.prep.splits import assign_splits, parse_split

DATASET = "covid19-radiography"
FOLDER_NAME = "COVID-19_Radiography_Dataset"
# The study's order: ImageFolder's alphabetical order of the folder names.
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
UNKNOWN_ORIGIN = "unknown"


def natural_key(name: str) -> list:
    """'COVID-10.png' after 'COVID-9.png'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def image_folder(class_dir: Path) -> Path:
    images = class_dir / "images"
    return images if images.is_dir() else class_dir


def metadata_key(name: object) -> str:
    """An image's file name or a metadata FILE NAME -> the key they share: the name without folders or an image
    extension, upper-cased ('COVID-1', 'covid-1.PNG' and 'images/COVID-1.png' all give 'COVID-1')."""
    text = normalize_path(str(name)).rsplit("/", 1)[-1]
    stem, dot, suffix = text.rpartition(".")
    if dot and stem and f".{suffix.lower()}" in SUPPORTED_SUFFIXES:
        text = stem
    return text.upper()


def read_origins(xlsx: Path) -> dict[str, str]:
    """metadata_key(FILE NAME) -> URL, for rows with a URL. A missing xlsx gives no origins; a malformed one is
    an error."""
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
        name = row[name_col] if len(row) > name_col else None
        url = str(row[url_col]).strip() if len(row) > url_col and row[url_col] is not None else ""
        if name is not None and str(name).strip() and url:
            origins[metadata_key(name)] = url
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

    records, skipped, identity, repeats, unknown = [], [], {}, 0, []
    folders = [src, *(src / c for c in CLASSES), *(image_folder(src / c) for c in CLASSES)]
    for label, name in enumerate(CLASSES):
        xlsx = src / f"{name}.metadata.xlsx"
        origins = read_origins(xlsx)
        folder = image_folder(src / name)
        files, unreadable, repeated = walk_files(folder, ignored={"masks"}, seen_folders=folders)
        skipped += [{**s, "source": (folder / s["source"]).relative_to(src).as_posix()} for s in unreadable]
        repeats += repeated
        without = 0
        for path in sorted(files, key=lambda p: natural_key(p.relative_to(folder).as_posix())):
            source = printable_name(path.relative_to(src).as_posix())  # names that are not UTF-8 escaped
            if path.suffix.lower() not in RASTER_SUFFIXES:
                skipped.append({"source": source, "reason": f"not an image file ({path.suffix or 'no suffix'})"})
                continue
            origin = origins.get(metadata_key(path.name))
            without += origin is None
            record = Record(path, source, "", {"label": label, "class": name, "origin": origin or UNKNOWN_ORIGIN})
            identity[id(record)] = file_id(path)
            records.append(record)
        if without:
            unknown.append((without, f"{name} {without} ({'not in' if xlsx.is_file() else 'no'} {xlsx.name})"))
    if not records:
        raise InputError(f"{src}: the class folders hold no images")
    merge_repeats(
        records,
        key=lambda r: identity[id(r)],
        value=lambda r: {"class": r.meta["class"]},
        where=lambda r: r.source,
        conflict="is one file in two class folders",
        name=lambda r: r.source,
    )

    labels = [r.meta["label"] for r in records]
    origins = [r.meta["origin"] for r in records]
    for record, assigned in zip(records, assign_splits(labels, fractions, seed, substrata=origins)):
        record.split = assigned
    notes = []
    if unknown:
        parts = ", ".join(part for _, part in unknown)
        notes.append(f"{sum(n for n, _ in unknown)} image(s) without a source URL, origin unknown: {parts}")
    if repeats:
        notes.append(f"{repeats} file(s) reached twice through links, packed once")
    return Plan(
        DATASET,
        "multiclass",
        list(CLASSES),
        records,
        {"src": printable_name(str(src)), "split": split},
        skipped,
        scan_notes=notes,
    )
