"""Fixture builders that rebuild the real dataset layouts exactly (see ../shared/notes/datasets.md)."""

from __future__ import annotations

import csv
import gzip
import os
import shutil
from pathlib import Path

import cv2
import numpy as np


def _shared() -> Path:
    """The team's shared folder beside the checkout (`../shared`); TWINRAY_SHARED overrides it. A clone made
    elsewhere (CI clones into a temp dir) falls back to the workplace's copy at /work/shared."""
    candidates = [os.environ.get("TWINRAY_SHARED"), Path(__file__).resolve().parents[2] / "shared", "/work/shared"]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "data" / "real-cxr").is_dir():
            return Path(candidate)
    raise RuntimeError(f"no shared data folder found (tried {candidates}); set TWINRAY_SHARED")


SHARED = _shared()
REAL_CXR = SHARED / "data" / "real-cxr"
KERMANY_CXR = SHARED / "data" / "kermany-cxr"
CHEXPERT_META = SHARED / "data" / "chexpert-meta" / "chexpert_train.csv.gz"


def flatten_covid(root: Path) -> None:
    """Turn the current layout into the older one: PNGs directly in each class folder, no masks/."""
    for class_dir in [d for d in root.iterdir() if d.is_dir()]:
        for png in (class_dir / "images").iterdir():
            png.rename(class_dir / png.name)
        (class_dir / "images").rmdir()
        shutil.rmtree(class_dir / "masks")


def real_chexpert_rows(n_patients: int) -> tuple[list[str], list[list[str]]]:
    """The header and every row of the first `n_patients` patients of the real train.csv."""
    with gzip.open(CHEXPERT_META, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows, patients = [], set()
        for row in reader:
            patient = row[0].split("/")[2]
            if patient not in patients and len(patients) == n_patients:
                break
            patients.add(patient)
            rows.append(row)
    return header, rows


def _write_jpeg(path: Path, seed: int, shape=(96, 80)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (0, 0), 3)
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])


def write_csv(path: Path, rows: list[list[str]], *, bom: bool = False, newline: str = "\n") -> None:
    """Rows as a CSV file the way different exporters write it: with Excel's UTF-8 BOM, and LF or CRLF endings."""
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        csv.writer(f, lineterminator=newline).writerows(rows)


def build_chexpert(parent: Path, n_patients: int = 40, top: str = "CheXpert-v1.0-small", n_valid: int = 6) -> Path:
    """CheXpert with real train.csv rows (real paths, codes, views) and synthetic JPEGs at those paths.
    valid.csv gets `n_valid` patients from 64541 on with 0/1 labels, as the real one has."""
    root = parent / top
    header, rows = real_chexpert_rows(n_patients)
    rows = [[top + r[0][r[0].index("/") :], *r[1:]] for r in rows]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    for k, row in enumerate(rows):
        _write_jpeg(parent / row[0], k)
    valid = []
    for j in range(n_valid):
        template = rows[j]
        path = f"{top}/valid/patient{64541 + j}/study1/view1_frontal.jpg"
        labels = ["1.0" if cell == "1.0" else "0.0" for cell in template[5:]]
        valid.append([path, template[1], template[2], "Frontal", template[4] or "AP", *labels])
        _write_jpeg(parent / path, 10_000 + j)
    with open(root / "valid.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *valid])
    return root


def read_grey(path, max_pixels=None, bit_depth=None) -> np.ndarray:
    """prep's reading of one file, without its notes: uint8 HxW grey (`read_image`'s defaults where None)."""
    from twinray.prep.images import DEFAULT_BIT_DEPTH, DEFAULT_MAX_PIXELS, read_image

    return read_image(path, max_pixels or DEFAULT_MAX_PIXELS, DEFAULT_BIT_DEPTH if bit_depth is None else bit_depth)[0]
