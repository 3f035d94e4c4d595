"""A generated stand-in for the COVID-19 Radiography Database, in its exact layout, for the demo and the tests.

Each image is a synthetic chest radiograph phantom (body, lungs, ribs, clavicles, spine, heart) at 299x299 with
random pose, exposure and noise. The class shows only as a finding inside the lungs, drawn with random size,
place and strength, so it is learnable but not trivial:

    COVID            bilateral, peripheral, lower-zone hazy ground-glass patches
    Lung_Opacity     one or two dense, sharp-edged focal consolidations
    Normal           clear lungs
    Viral Pneumonia  bilateral perihilar streaky (interstitial) texture

Distractors common to all classes (nodules, tubes, exposure, source style) keep brightness from giving it away.

`dicom_tree` writes the same phantoms as a hospital's DICOM export instead (`prep sample --dicom-tree`): a DICOMDIR
and PATIENT/STUDY/SERIES/IMAGE folders of files without a suffix, with PatientIDs, frontal and lateral views and a
few objects that are not images, for `prep images`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from twinray.cli import InputError
from twinray.prep.datasets.covid import CLASSES, FOLDER_NAME

SIZE = 299
MASK_SIZE = 256
REAL_COUNTS = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}
SOURCES = {
    "rsna": "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data",
    "kermany": "https://www.kaggle.com/paultimothymooney/chest-xray-pneumonia",
    "bimcv": "https://bimcv.cipf.es/bimcv-projects/bimcv-covid19/#1590858128006-9e640421-6711",
    "german": "https://github.com/ml-workgroup/covid-19-image-repository/tree/master/png",
    "sirm": "https://sirm.org/category/senza-categoria/covid-19/",
    "cohen": "https://github.com/ieee8023/covid-chestxray-dataset",
    "eurorad": "https://eurorad.org",
    "cxnet": "https://github.com/armiro/COVID-CXNet",
}
# Which sources feed each class, as in the real database.
CLASS_SOURCES = {
    "COVID": {"bimcv": 0.5, "german": 0.05, "sirm": 0.1, "cohen": 0.15, "eurorad": 0.05, "cxnet": 0.15},
    "Lung_Opacity": {"rsna": 1.0},
    "Normal": {"rsna": 0.85, "kermany": 0.15},
    "Viral Pneumonia": {"kermany": 1.0},
}
# Per-source acquisition style (gamma, contrast): a mild, realistic dataset bias.
SOURCE_STYLE = {
    "rsna": (1.0, 1.0),
    "kermany": (0.9, 1.1),
    "bimcv": (1.1, 0.95),
    "german": (1.05, 1.0),
    "sirm": (0.95, 1.05),
    "cohen": (1.0, 0.9),
    "eurorad": (1.1, 1.1),
    "cxnet": (0.95, 0.95),
}


def class_counts(n: int) -> dict[str, int]:
    """Split n like the real database (Normal largest, Viral Pneumonia smallest), at least 2 per class."""
    if n < 2 * len(CLASSES):
        raise InputError(f"--n {n} is too small: at least {2 * len(CLASSES)} images (2 per class)")
    total = sum(REAL_COUNTS.values())
    counts = {c: max(2, round(n * REAL_COUNTS[c] / total)) for c in CLASSES}
    counts["Normal"] += n - sum(counts.values())
    return counts


class _Canvas:
    """Coordinates of one image in patient space (after a random pose), and soft shapes drawn on them."""

    def __init__(self, rng: np.random.Generator, size: int):
        yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
        angle, scale = rng.normal(0, 0.04), rng.uniform(0.9, 1.08)
        dx, dy = rng.normal(0, 0.04, 2)
        c, s = np.cos(angle), np.sin(angle)
        self.x = (c * xx + s * yy) / scale - dx
        self.y = (-s * xx + c * yy) / scale - dy
        self.rng = rng

    def ellipse(self, cx, cy, rx, ry, edge=0.08):
        r = ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2
        return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -50, 50)))

    def blob(self, cx, cy, sigma):
        return np.exp(-(((self.x - cx) ** 2 + (self.y - cy) ** 2) / (2 * sigma**2)))

    def curve(self, y_of_x, width, x_range):
        band = np.exp(-(((self.y - y_of_x(self.x)) / width) ** 2))
        return band * ((np.abs(self.x) > x_range[0]) & (np.abs(self.x) < x_range[1]))


def _finding(canvas: _Canvas, name: str, lungs: np.ndarray, size: int) -> np.ndarray:
    rng = canvas.rng
    density = np.zeros_like(lungs)
    if name == "COVID":
        for k in range(rng.integers(2, 6)):
            side = 1 if k % 2 else -1  # alternate sides: bilateral
            cx, cy = side * rng.uniform(0.42, 0.6), rng.uniform(-0.05, 0.4)
            density += rng.uniform(0.06, 0.16) * canvas.blob(cx, cy, rng.uniform(0.07, 0.14))
    elif name == "Lung_Opacity":
        side = rng.choice([-1, 1])
        for _ in range(rng.integers(1, 3)):
            cx, cy = side * rng.uniform(0.22, 0.5), rng.uniform(-0.4, 0.35)
            rx, ry = rng.uniform(0.06, 0.15, 2)
            density += rng.uniform(0.16, 0.3) * canvas.ellipse(cx, cy, rx, ry, edge=0.15)
    elif name == "Viral Pneumonia":
        # Zero crossings of smoothed noise form a net of lines: a reticular, interstitial look.
        texture = cv2.GaussianBlur(rng.normal(0, 1, lungs.shape), (0, 0), 2.5)
        net = np.exp(-((texture / (0.25 * texture.std())) ** 2))
        hila = canvas.blob(-0.25, -0.02, 0.28) + canvas.blob(0.25, -0.02, 0.28)
        density += rng.uniform(0.08, 0.18) * net * np.clip(hila, 0, 1)
    return density * lungs


def phantom(rng: np.random.Generator, name: str, style: tuple[float, float], size: int = SIZE, strength: float = 1.0):
    """One radiograph (uint8 size x size) and its lung mask (bool), higher = more attenuation = whiter.
    `strength` scales the finding's density (1: subtle, as in the demo)."""
    canvas = _Canvas(rng, size)
    body = canvas.ellipse(0, 0.12, rng.uniform(0.85, 0.95), 1.15, edge=0.05)
    lung_w, lung_h = rng.uniform(0.9, 1.1, 2)
    lungs = np.maximum(
        canvas.ellipse(-0.37, -0.08, 0.26 * lung_w, 0.55 * lung_h),
        canvas.ellipse(0.37, -0.08, 0.26 * lung_w, 0.55 * lung_h),
    )
    heart_scale = rng.uniform(0.85, 1.15)
    heart = canvas.ellipse(0.1, 0.3, 0.28 * heart_scale, 0.22 * heart_scale)
    spine = canvas.ellipse(0, 0.0, 0.07, 1.2, edge=0.2)

    density = 0.06 + 0.45 * body - 0.3 * lungs + 0.1 * spine
    density = density * (1 - 0.8 * heart) + 0.55 * heart * body
    for k in range(9):
        y0 = -0.66 + 0.12 * k + rng.normal(0, 0.01)
        density += 0.06 * body * canvas.curve(lambda x, y0=y0: y0 + 0.25 * x**2, 0.018, (0.08, 0.7))
    density += 0.12 * canvas.curve(lambda x: -0.74 + 0.16 * np.abs(x), 0.025, (0.08, 0.55))  # clavicles
    density += strength * _finding(canvas, name, lungs * (1 - heart), size)

    if rng.random() < 0.3:  # a calcified nodule, any class
        density += 0.25 * canvas.blob(rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.4), 0.015) * lungs
    if rng.random() < 0.25:  # a line or tube, any class
        x0 = rng.uniform(-0.1, 0.1)
        tube = np.exp(-(((canvas.x - x0 - 0.1 * (canvas.y + 1) ** 2) / 0.012) ** 2)) * (canvas.y < 0.2)
        density += 0.3 * tube

    gamma, contrast = style
    gamma *= rng.uniform(0.85, 1.15)
    contrast *= rng.uniform(0.85, 1.15)
    image = np.clip(density, 0, 1) ** gamma
    image = (image - 0.5) * contrast + 0.5 + rng.uniform(-0.08, 0.08)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.1))
    image = image + rng.normal(0, rng.uniform(0.008, 0.025), image.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), lungs > 0.5


def _render(job: tuple[int, str, int, str, str, float]) -> None:
    seed, name, number, source, folder, strength = job
    rng = np.random.default_rng([seed, CLASSES.index(name), number])
    image, lungs = phantom(rng, name, SOURCE_STYLE[source], strength=strength)
    stem = f"{name}-{number}"
    cv2.imwrite(str(Path(folder) / name / "images" / f"{stem}.png"), image)
    mask = cv2.resize(lungs.astype(np.uint8) * 255, (MASK_SIZE, MASK_SIZE), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(Path(folder) / name / "masks" / f"{stem}.png"), cv2.merge([mask, mask, mask]))


def _write_metadata(folder: Path, name: str, sources: list[str]) -> None:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(["FILE NAME", "FORMAT", "SIZE", "URL"])
    prefix = "NORMAL" if name == "Normal" else name  # the real Normal sheet is upper-cased
    for number, source in enumerate(sources, start=1):
        sheet.append([f"{prefix}-{number}", "PNG", "256*256", SOURCES[source]])
    book.save(folder / f"{name}.metadata.xlsx")


def generate(
    out: str | Path,
    n: int = 400,
    seed: int = 0,
    workers: int = 1,
    force: bool = False,
    metadata: bool = True,
    strength: float = 1.0,
) -> Path:
    """Writes OUT/COVID-19_Radiography_Dataset/ and returns it; an existing complete copy is kept unless forced.
    `strength` scales every finding: a few CPU minutes of pretraining learn them at 3, not at the subtle 1."""
    root = Path(out) / FOLDER_NAME
    done = root / "README.md.txt"
    if done.is_file() and not force:
        return root
    counts = class_counts(n)
    tmp = Path(out) / f".{FOLDER_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    jobs = []
    for name in CLASSES:
        (tmp / name / "images").mkdir(parents=True)
        (tmp / name / "masks").mkdir(parents=True)
        names, weights = zip(*CLASS_SOURCES[name].items())
        sources = list(rng.choice(names, size=counts[name], p=weights))
        if metadata:  # without it, `prep covid` records every origin as unknown
            _write_metadata(tmp, name, sources)
        jobs += [(seed, name, i + 1, s, str(tmp), strength) for i, s in enumerate(sources)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_render, jobs, chunksize=16)
    else:
        for job in jobs:
            _render(job)
    (tmp / "README.md.txt").write_text(
        "Synthetic stand-in for the COVID-19 Radiography Database, generated by `python -m prep sample`.\n"
        f"{n} phantom radiographs, seed {seed}, finding strength {strength}. Not real patients; for demos and tests"
        " only.\n"
    )
    if root.exists():
        shutil.rmtree(root)
    os.rename(tmp, root)
    return root


DICOM_FOLDER = "dicom-export"
DICOM_MANUFACTURER = "twinray phantom"


def _uid(*parts) -> str:
    """A UID under pydicom's root derived from `parts` (seed, patient, study, ...): the same tree every run."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["twinray sample", *map(str, parts)])


def _dicom_base(sop_class: str, modality: str, patient: dict, study: dict, series_uid: str, series_number: int):
    """The modules every object of the tree shares (Patient, General Study, General Series, SOP Common), with
    what pydicom's FileSet needs for the DICOMDIR's records (PS3.3 F.5)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = _uid(series_uid, "instance")
    ds.PatientID, ds.PatientName = patient["id"], patient["name"]
    ds.PatientSex, ds.PatientAge = patient["sex"], patient["age"]
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study["uid"], study["id"], ""
    ds.StudyDate, ds.StudyTime = study["date"], "093000"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, 1
    ds.Modality = modality
    ds.Manufacturer = DICOM_MANUFACTURER
    return ds


def _dicom_image(pixels: np.ndarray, sop_class: str, modality: str, view: str | None, **common):
    """A 12-bit MONOCHROME2 radiograph of `pixels` (uint8, scaled by 16)."""
    ds = _dicom_base(sop_class, modality, **common)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.BodyPartExamined = "CHEST"
    if view is not None:
        ds.ViewPosition = view
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    return ds


def dicom_tree(out: str | Path, patients: int = 30, seed: int = 0, size: int = 128, force: bool = False) -> Path:
    """Writes OUT/dicom-export/ and returns it; an existing complete copy (its DICOMDIR) of the same patients and
    seed is kept unless forced. Unless forced, a copy of other patients or seed (its README.TXT says which) and an
    OUT/dicom-export without a DICOMDIR (not one this wrote) are an InputError.

    pydicom's FileSet writes the DICOMDIR and names the files PTnnnnnn/STnnnnnn/SEnnnnnn/IMnnnnnn (SR, PR for
    those objects), without a suffix, as media exports do. Patient k (PatientID `TR0001`, ...) has two studies, the
    first CR, the second DX, each with a frontal image (PA, then AP; series 1) and a lateral one (LL; series 2) of
    `size` x `size` phantoms. Besides: a Basic Text SR in each first study; in every third patient's second study
    (k % 3 == 2) a Grayscale Softcopy Presentation State, and a frontal image without ViewPosition; in every fourth
    patient's second study (k % 4 == 1) a CT image. Nothing here is a real patient."""
    from pydicom.dataset import Dataset
    from pydicom.fileset import FileSet
    from pydicom.uid import (
        BasicTextSRStorage,
        ComputedRadiographyImageStorage,
        CTImageStorage,
        DigitalXRayImageStorageForPresentation,
        GrayscaleSoftcopyPresentationStateStorage,
    )

    if patients < 1:
        raise InputError(f"--patients {patients} must be at least 1")
    root = Path(out) / DICOM_FOLDER
    if (root / "DICOMDIR").is_file() and not force:
        wanted = f"{patients} phantom patients, seed {seed}."
        readme = root / "README.TXT"
        said = readme.read_text() if readme.is_file() else ""
        if f": {wanted}" in said or "phantom patients" not in said:  # this sample, or an export that records nothing
            return root
        held = said.split(": ", 1)[-1].split(". ", 1)[0]
        raise InputError(f"{root} holds another sample ({held}), not {wanted[:-1]}; pass --force to regenerate it")
    if root.exists() and not force:  # never an interrupted sample (it is renamed into place whole): someone's files
        raise InputError(
            f"{root} exists and holds no DICOMDIR, so it is not a sample export; pass --force to "
            "replace it, or give another --out"
        )
    rng = np.random.default_rng(seed)
    fs = FileSet()
    for k in range(patients):
        patient = {
            "id": f"TR{k + 1:04d}",
            "name": f"Phantom^{k + 1:04d}",
            "sex": "FM"[k % 2],
            "age": f"{20 + (7 * k) % 75:03d}Y",
        }
        for s in range(2):
            study = {"uid": _uid(seed, k, s), "id": str(s + 1), "date": f"2020{1 + s * 6:02d}{1 + k % 28:02d}"}
            common = {"patient": patient, "study": study}
            cr = s == 0
            sop, modality = (
                (ComputedRadiographyImageStorage, "CR") if cr else (DigitalXRayImageStorageForPresentation, "DX")
            )
            frontal, _ = phantom(rng, "Normal", SOURCE_STYLE["rsna"], size=size)
            lateral, _ = phantom(rng, "Normal", SOURCE_STYLE["rsna"], size=size)
            view = None if (k % 3 == 2 and not cr) else ("PA" if cr else "AP")
            fs.add(
                _dicom_image(frontal, sop, modality, view, series_uid=_uid(seed, k, s, 1), series_number=1, **common)
            )
            lateral = np.ascontiguousarray(np.rot90(lateral))  # a side view: not the frontal picture again
            fs.add(
                _dicom_image(lateral, sop, modality, "LL", series_uid=_uid(seed, k, s, 2), series_number=2, **common)
            )
            if cr:
                sr = _dicom_base(BasicTextSRStorage, "SR", series_uid=_uid(seed, k, s, 3), series_number=3, **common)
                code = Dataset()
                code.CodeValue, code.CodingSchemeDesignator = "18748-4", "LN"
                code.CodeMeaning = "Diagnostic imaging report"
                sr.ConceptNameCodeSequence = [code]
                sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
                sr.ContentDate, sr.ContentTime = study["date"], "100000"
                fs.add(sr)
            elif k % 3 == 2:
                pr = _dicom_base(
                    GrayscaleSoftcopyPresentationStateStorage,
                    "PR",
                    series_uid=_uid(seed, k, s, 3),
                    series_number=3,
                    **common,
                )
                pr.PresentationCreationDate, pr.PresentationCreationTime = study["date"], "100000"
                pr.ContentLabel = "ANNOTATION"
                fs.add(pr)
            if not cr and k % 4 == 1:
                ct, _ = phantom(rng, "Normal", SOURCE_STYLE["rsna"], size=size)
                fs.add(
                    _dicom_image(
                        ct, CTImageStorage, "CT", None, series_uid=_uid(seed, k, s, 4), series_number=4, **common
                    )
                )
    tmp = Path(out) / f".{DICOM_FOLDER}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fs.write(tmp)
    finally:  # FileSet stages its files in a TemporaryDirectory it never removes itself (pydicom 3.0)
        stage = getattr(fs, "_stage", {}).get("t")
        if stage is not None:
            stage.cleanup()
    (tmp / "README.TXT").write_text(
        f"Synthetic DICOM export generated by `python -m prep sample --dicom-tree`: {patients} phantom patients, "
        f"seed {seed}. Not real patients; for demos and tests only.\n"
    )
    if root.exists():
        shutil.rmtree(root)
    os.rename(tmp, root)
    return root
