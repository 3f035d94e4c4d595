"""DICOM headers, read without the pixels: which objects are images, which images a selection keeps, who the
patient is, and the per-image fields that go into a sample's JSON.

A header is read with pydicom's `stop_before_pixels` (the pixel data, nearly all of a radiograph's bytes, is never
read here) and `force` (files without preamble). Attributes, PS3.3:

    ViewPosition (0018,5101) C.8.11.5     PA, AP, LL, RL, ...   the radiographic view
    Modality (0008,0060) C.7.3.1.1.1      CR, DX, CT, MR, SR, PR ...
    BodyPartExamined (0018,0015) C.7.3.1  CHEST, ...
    PatientID (0010,0020), StudyInstanceUID (0020,000D), StudyDate (0008,0020): identifying (PHI)
    PatientSex (0010,0040), PatientAge (0010,1010, an Age String "045Y"), Manufacturer (0008,0070)

An object without Rows (0028,0010) has no Image Pixel module (PS3.3 C.7.6.3): a structured report, a presentation
state, a key object selection. A DICOMDIR (Media Storage Directory Storage, PS3.10 8.6) lists the export's files.
Both are skipped with that reason; a file whose header does not parse is skipped with pydicom's error.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from twinray.cli import InputError

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# Sample JSON keys taken from the header (docs/format.md, "Sample JSON"), and the ones that identify a person.
KEPT = ("view", "modality", "body_part", "sex", "age", "manufacturer", "patient", "study", "study_date")
PHI = ("patient", "study", "study_date")
AGE_CAP = 90  # HIPAA Safe Harbor, 45 CFR 164.514(b)(2)(i)(C): ages over 89 are one category, "90 or older"
# `--views frontal` and the words a reason uses for the views it leaves out.
FRONTAL = ("PA", "AP")
VIEW_KINDS = {
    **dict.fromkeys(("LL", "RL", "LAT", "LATERAL", "LEFT LATERAL", "RIGHT LATERAL"), "lateral"),
    **dict.fromkeys(("RLO", "LLO", "RAO", "LAO", "RPO", "LPO", "OBLIQUE"), "oblique"),
    **dict.fromkeys(("RLD", "LLD"), "decubitus"),
    **dict.fromkeys(FRONTAL, "frontal"),
}
ATTRIBUTES = {"views": "ViewPosition", "modalities": "Modality", "body_parts": "BodyPartExamined"}
FIELDS = {"views": "view", "modalities": "modality", "body_parts": "body_part"}  # Header's field of each


@dataclass
class Header:
    """What prep uses of one DICOM file's header; text values stripped, None where absent or empty."""

    sop_class: str  # the SOP Class's name (pydicom's UID dictionary), or its UID
    directory: bool  # a DICOMDIR
    image: bool  # holds an Image Pixel module (Rows)
    view: str | None = None
    modality: str | None = None
    body_part: str | None = None
    sex: str | None = None
    age: float | None = None  # years
    manufacturer: str | None = None
    patient: str | None = None
    study: str | None = None
    study_date: str | None = None

    def fields(self, drop_phi: bool = False) -> dict:
        """The sample JSON fields (KEPT); without PHI and with ages over 89 given as 90 when `drop_phi`."""
        kept = {key: getattr(self, key) for key in KEPT if not (drop_phi and key in PHI)}
        if drop_phi and kept["age"] is not None:
            kept["age"] = min(kept["age"], AGE_CAP)
        return kept


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def parse_age(text: str | None) -> float | None:
    """A DICOM Age String (PS3.5 6.2, AS: three digits and D, W, M or Y: '045Y', '018M') -> years, or None when
    absent or not in that form. Days, weeks and months are rounded to 0.01 year."""
    if not text or len(text) != 4 or not text[:3].isdigit() or text[3].upper() not in "DWMY":
        return None
    per_year = {"D": 365.25, "W": 365.25 / 7, "M": 12, "Y": 1}[text[3].upper()]
    years = int(text[:3]) / per_year
    return float(int(years)) if per_year == 1 else round(years, 2)


def read_header(path: str | Path) -> Header | str:
    """One DICOM file's header -> Header, or the skip reason (str) when pydicom cannot parse it."""
    import pydicom
    from pydicom.uid import UID

    try:
        if Path(path).stat().st_size == 0:
            return "empty file"
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        meta = getattr(ds, "file_meta", None)
        meta_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
        uid = str(ds.get("SOPClassUID") or meta_class or "")
        name = UID(uid).name if uid else "no SOP Class UID"
        directory = str(meta_class or "") == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds
        return Header(
            sop_class=name,
            directory=directory,
            image="Rows" in ds,
            view=(_text(ds, "ViewPosition") or "").upper() or None,
            modality=(_text(ds, "Modality") or "").upper() or None,
            body_part=(_text(ds, "BodyPartExamined") or "").upper() or None,
            sex=_text(ds, "PatientSex"),
            age=parse_age(_text(ds, "PatientAge")),
            manufacturer=_text(ds, "Manufacturer"),
            patient=_text(ds, "PatientID"),
            study=_text(ds, "StudyInstanceUID"),
            study_date=_text(ds, "StudyDate"),
        )
    except Exception as e:  # pydicom raises many types for broken files
        text = " ".join(str(e).split())
        return f"unreadable DICOM header ({type(e).__name__}: {text[:200]})"


def read_headers(paths: Sequence[Path], workers: int = 1) -> list[Header | str]:
    """`read_header` of each path, in order; in `workers` processes when there are enough files to pay for them."""
    jobs = [str(p) for p in paths]
    if workers <= 1 or len(jobs) < 256:
        return [read_header(p) for p in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(read_header, jobs, chunksize=64)


def not_an_image(header: Header) -> str | None:
    """The skip reason of a DICOM object that is not an image (a DICOMDIR, an SR, a presentation state; a file with
    no SOP Class UID; an image class whose Image Pixel module is missing, as in a file cut short), or None."""
    if header.directory:
        return "DICOMDIR (the export's directory of files, not an image)"
    if not header.image and header.sop_class == "no SOP Class UID":
        return "not a DICOM object (no SOP Class UID, no pixel data)"
    if not header.image and "Image Storage" in header.sop_class:  # an image's class, its pixel module gone
        return f"image without its pixel module ({header.sop_class}: the file is cut short or incomplete)"
    if not header.image:
        return f"not an image ({header.sop_class}: no pixel data)"
    return None


def parse_values(text: str, flag: str, aliases: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...] | None:
    """'PA,AP' -> ('PA', 'AP'); 'all' -> None (no selection); an alias ('frontal') -> its values. Values are
    upper-cased, as the Code Strings they are matched against (PS3.5 6.2, CS) are. Raises InputError for an empty
    list."""
    words = [w.strip().upper() for w in str(text).split(",") if w.strip()]
    if not words:
        raise InputError(f"{flag} {text!r}: give values separated by commas, or 'all'")
    if words == ["ALL"]:
        return None
    values: list[str] = []
    for word in words:
        values += (aliases or {}).get(word.lower(), (word,))
    return tuple(dict.fromkeys(values))


@dataclass
class Selection:
    """Which DICOM images are kept: by ViewPosition, Modality and BodyPartExamined (None: any value). An image
    without the attribute is kept, and counted as unknown. Raster files (no header) are always kept."""

    views: tuple[str, ...] | None = FRONTAL
    modalities: tuple[str, ...] | None = ("CR", "DX")
    body_parts: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, views: str = "frontal", modalities: str = "CR,DX", body_parts: str = "all") -> Selection:
        return cls(
            parse_values(views, "--views", {"frontal": FRONTAL}),
            parse_values(modalities, "--modalities"),
            parse_values(body_parts, "--body-parts"),
        )

    def check(self, header: Header) -> tuple[str | None, list[str]]:
        """(why this image is left out, e.g. 'lateral (ViewPosition LL)', or None when it is kept; the keywords of
        the selected attributes it lacks, which leave it kept and unknown)."""
        checks = (
            (self.modalities, header.modality, "Modality", lambda v: "other modality"),
            (self.views, header.view, "ViewPosition", lambda v: VIEW_KINDS.get(v, "other view")),
            (self.body_parts, header.body_part, "BodyPartExamined", lambda v: "other body part"),
        )
        lacking = []
        for wanted, value, keyword, kind in checks:
            if wanted is None:
                continue
            if value is None:
                lacking.append(keyword)
            elif value not in wanted:
                return f"{kind(value)} ({keyword} {value})", lacking
        return None, lacking

    def check_matches(self, images: Sequence[Header]) -> None:
        """Raises InputError when a selected attribute that these image headers carry holds none of the values
        kept (a typo such as `--views fronal`, or `--modalities CR,DX` on a CT export): every DICOM image carrying
        it would be left out, which is never what was meant. Images without the attribute are kept (unknown), so
        they say nothing here."""
        for name, keyword in ATTRIBUTES.items():
            wanted = getattr(self, name)
            values = Counter(getattr(h, FIELDS[name]) for h in images if getattr(h, FIELDS[name]) is not None)
            if wanted is None or not values or any(v in values for v in wanted):
                continue
            found = ", ".join(f"{v} {n}" for v, n in values.most_common(8))
            more = f" and {len(values) - 8} more" if len(values) > 8 else ""
            raise InputError(
                f"--{name.replace('_', '-')} {','.join(wanted)} keeps no DICOM image: their {keyword} is "
                f"{found}{more}; give some of those, or 'all'"
            )

    def describe(self) -> dict:
        """For the manifest: each attribute's kept values ('all' for any)."""
        return {
            keyword: list(getattr(self, name)) if getattr(self, name) is not None else "all"
            for name, keyword in ATTRIBUTES.items()
        }
