"""`prep images`: every image file under a folder tree, at any depth, packed without labels (task "none").

    SRC/**/*.{png,jpg,jpeg,bmp,tif,tiff,dcm}, and DICOM files without a suffix (PATIENT/STUDY/SERIES/IM0001)

The walk and its rules are `prep folder`'s (`folder.scan_tree`): links followed, loops cut, a file reached twice
packed once, hidden names and `masks/` folders passed over, non-UTF-8 names escaped, other files skipped by name.

DICOM files are first read by their header alone (prep/dicom_headers.py): a DICOMDIR, a structured report or a
presentation state is skipped with that reason; an image is kept or left out by ViewPosition, Modality and
BodyPartExamined (`--views frontal --modalities CR,DX` by default), each left out with its reason; an image that
lacks an attribute is kept and counted as unknown.

The split keeps each patient's images in one split. The patient is, in this order of choice (`--patient-from`):
DICOM PatientID (`dicom`, what `auto` takes; a file with no PatientID falls back on its StudyInstanceUID), the
name of the folder N levels under SRC (`level:N`), or a CSV column (`--csv FILE --patient-col COL`). Without any,
the split is per image, and the summary line says so.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from twinray.cli import InputError
from twinray.prep.build import Plan, Record, count_reasons
from twinray.prep.datasets import folder
from twinray.prep.datasets.inputs import label_value, merge_repeats, normalize_path, printable_name, read_table
from twinray.prep.dicom import is_dicom_file
from twinray.prep.dicom_headers import KEPT, PHI, Header, Selection, not_an_image, read_headers
from twinray.prep.images import DICOM_SUFFIXES
from twinray.prep.splits import assign_splits, parse_split

DATASET = "images"
PATIENT_SOURCES = ("auto", "dicom", "level:N", "csv", "none")


def parse_patient_from(text: str, csv_file) -> tuple[str, int]:
    """`--patient-from` -> (kind, level): kind is dicom, level, csv or none; `auto` is csv with --csv, else dicom.
    Raises InputError for another value, level 0, or `csv` without --csv."""
    text = str(text).strip().lower()
    if text == "auto":
        return ("csv", 0) if csv_file else ("dicom", 0)
    if text in ("dicom", "none"):
        return text, 0
    if text == "csv":
        if not csv_file:
            raise InputError("--patient-from csv needs --csv FILE (and --patient-col, the column of patient ids)")
        return "csv", 0
    if text.startswith("level:") and text[6:].isdigit() and int(text[6:]) >= 1:
        return "level", int(text[6:])
    raise InputError(
        f"--patient-from {text!r} is not auto, dicom, level:N (N >= 1: the folder N levels under --src), csv or none"
    )


def _patients_from_csv(csv_file: Path, path_col: str, patient_col: str) -> tuple[dict[str, str], str]:
    """{source path: patient} from a CSV's path and patient columns (paths relative to --src; missing cells are no
    patient), and a note on rows that were skipped."""
    _, rows, bad = read_table(csv_file, [path_col, patient_col])
    table = printable_name(csv_file.name)
    entries = []
    for line, row in rows:
        path = normalize_path(row[path_col])
        patient = label_value(row[patient_col])
        if path and patient is not None:
            entries.append((path, patient, f"{table}:{line}"))
    entries, _ = merge_repeats(
        entries,
        key=lambda e: e[0],
        value=lambda e: {"patient": e[1]},
        where=lambda e: e[2],
        conflict="listed twice with different patients",
    )
    mapping = {path: patient for path, patient, _ in entries}
    note = f"{len(bad)} row(s) of {table} skipped ({bad[0]['source']}: {bad[0]['reason']})" if bad else ""
    return mapping, note


def plan(
    src: str | Path,
    views: str = "frontal",
    modalities: str = "CR,DX",
    body_parts: str = "all",
    patient_from: str = "auto",
    csv_file: str | Path | None = None,
    path_col: str = "path",
    patient_col: str = "patient",
    drop_phi: bool = False,
    split: str = "80/10/10",
    seed: int = 0,
    name: str | None = None,
    workers: int = 1,
) -> Plan:
    """The plan of `prep images` (the module's docstring says what it does). `views`, `modalities` and
    `body_parts` are comma lists or 'all' (`views` also 'frontal': PA, AP). `drop_phi` leaves PatientID,
    StudyInstanceUID and StudyDate (and a folder's or CSV's patient) out of every sample's JSON and gives ages over 89
    as 90; the split still keeps patients whole. Raises InputError in one line for a missing folder, bad values, a
    tree with no image at all, or one whose every image the selection leaves out."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: no such folder")
    fractions = parse_split(split)
    selection = Selection.parse(views, modalities, body_parts)
    kind, level = parse_patient_from(patient_from, csv_file)
    csv_patients, csv_note = {}, ""
    if kind == "csv":
        if not patient_col:
            raise InputError("--csv needs --patient-col, the column of patient ids")
        csv_patients, csv_note = _patients_from_csv(Path(csv_file), path_col, patient_col)

    found, skipped, repeats = folder.scan_tree(src, src)
    if not found:
        what = f" ({len(skipped)} file(s): {count_reasons(s['reason'] for s in skipped)})" if skipped else ""
        raise InputError(f"{src}: no image file found at any depth{what}")
    dicom = [path.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path) for path, _ in found]
    headers_read = read_headers([path for (path, _), d in zip(found, dicom) if d], workers)
    headers = iter(headers_read)

    kept: list[tuple[Path, str, Header | None]] = []
    left_out: list[str] = []
    lacking: dict[str, list[str]] = {}  # source -> selected attributes its header lacks
    for (path, source), is_dicom in zip(found, dicom):
        header = next(headers) if is_dicom else None
        if isinstance(header, str):  # the header does not parse
            skipped.append({"source": source, "reason": header})
            continue
        reason = None
        if header is not None:
            reason = not_an_image(header)
            if reason is None:
                reason, lacking[source] = selection.check(header)
        if reason:
            skipped.append({"source": source, "reason": reason})
            if header.image and not header.directory:
                left_out.append(reason)
            continue
        kept.append((path, source, header))
    selection.check_matches([h for h in headers_read if isinstance(h, Header) and h.image and not h.directory])
    if not kept:
        hint = " (--views, --modalities and --body-parts all keep every image)" if left_out else ""
        raise InputError(f"{src}: no image left to pack: {count_reasons(s['reason'] for s in skipped)}{hint}")

    patients = []
    for _, source, header in kept:
        patient = None
        if kind == "dicom" and header is not None:
            if header.patient or header.study:  # a file without PatientID: its study is one patient's
                patient = ("patient", header.patient) if header.patient else ("study", header.study)
        elif kind == "level":
            parts = source.split("/")
            patient = parts[level - 1] if len(parts) > level else None  # a folder, never the file's own name
        elif kind == "csv":
            patient = csv_patients.get(normalize_path(source))
        patients.append(patient)
    if kind == "csv" and all(p is None for p in patients):  # patients asked for, none matched: never per image
        table = printable_name(str(csv_file))
        if not csv_patients:
            raise InputError(f"--csv {table}: no row has both a {path_col!r} and a {patient_col!r}")
        raise InputError(
            f"--csv {table}: none of its {len(csv_patients)} paths is an image found under {src} (its first: "
            f"{next(iter(csv_patients))!r}; the images' paths, relative to --src, are like {kept[0][1]!r})"
        )
    if kind == "level" and all(p is None for p in patients):  # a level deeper than every image: a wrong N
        deepest = max(source.count("/") for _, source, _ in kept)
        choices = f"level:1 to level:{deepest}" if deepest else "--patient-from none (every image lies in it)"
        raise InputError(
            f"--patient-from level:{level}: no image lies in a folder {level} level(s) under {src} (the deepest "
            f"lies {deepest} level(s) down); give {choices}"
        )

    records = []
    for (path, source, header), patient in zip(kept, patients):
        meta = header.fields(drop_phi) if header is not None else {}
        if kind in ("level", "csv") and patient is not None and not drop_phi:
            meta["patient"] = patient  # `patient` is always the one the split kept whole
        records.append(Record(path, source, "", meta))
    for record, assigned in zip(records, assign_splits([0] * len(records), fractions, seed, patients)):
        record.split = assigned

    described = {
        "dicom": "DICOM PatientID",
        "level": f"folder level {level} under --src",
        "csv": f"column {patient_col!r} of {printable_name(str(csv_file))}",
        "none": None,
    }[kind]
    unit_of = {source: patient for (_, source, _), patient in zip(kept, patients)}
    study_of = {source: (h.patient, h.study) for _, source, h in kept if h is not None and h.study}
    choice = selection.describe()

    def describe_packed(packed: list[str]) -> tuple[dict, list[str]]:
        """The manifest's `patients` and `selection` counts, and their summary notes, over the images packed."""
        units = {unit_of[s] for s in packed if unit_of[s] is not None}
        without = sum(unit_of[s] is None for s in packed)
        studies = {study_of[s] for s in packed if s in study_of}
        by_study = sum(1 for u in units if kind == "dicom" and u[0] == "study")
        notes = []
        if units:
            line = f"{len(units)} patients from {described}"
            if kind == "dicom":
                line += f" ({len(studies)} studies" + (f"; {by_study} by StudyInstanceUID alone" if by_study else "")
                line += ")"
            line += ", each in one split"
            if without:
                line += f"; {without} image(s) without a patient, each its own unit"
            notes.append(line)
        elif kind == "none":
            notes.append("split per image (--patient-from none)")
        elif kind == "dicom":
            notes.append(
                "split per image: no patient information (no DICOM PatientID; --patient-from level:N or --csv)"
            )
        else:
            notes.append(f"split per image: no patient information ({described} gave none)")
        dicom_packed = sum(s in lacking for s in packed)
        unknown = Counter(keyword for s in packed for keyword in lacking.get(s, ()))
        active = [f"{k} {'/'.join(v)}" for k, v in choice.items() if v != "all"]
        if dicom_packed and active:
            line = "kept DICOM images with " + ", ".join(active)
            said = [f"{n} without {k}" for k, n in unknown.items()]
            notes.append(line + (f" ({', '.join(said)}: kept, unknown)" if said else ""))
        entries = {
            "patients": {
                "from": described if units else None,
                "count": len(units),
                "studies": len(studies) if kind == "dicom" and studies else None,
                "images_without": without,
                "split": "by patient" if units else "per image",
            },
            "selection": {
                **choice,
                "left_out": dict(Counter(left_out).most_common()),
                "unknown": dict(unknown),
                "dicom_images": dicom_packed,
                "other_images": len(packed) - dicom_packed,
            },
        }
        return entries, notes

    notes = [f"{repeats} file(s) reached twice through links, packed once"] if repeats else []
    if csv_note:
        notes.append(csv_note)
    if drop_phi:
        notes.append(f"--drop-phi: {', '.join(PHI)} left out of the sample JSON, ages over 89 given as 90")
    manifest = {"metadata": {"kept": [k for k in KEPT if not (drop_phi and k in PHI)], "drop_phi": drop_phi}}
    args = {
        "src": printable_name(str(src)),
        "views": views,
        "modalities": modalities,
        "body_parts": body_parts,
        "patient_from": patient_from,
        "csv": printable_name(str(csv_file)) if csv_file else None,
        "drop_phi": drop_phi,
        "split": split,
    }
    return Plan(
        printable_name(name or src.name or DATASET),
        "none",
        [],
        records,
        args,
        skipped,
        scan_notes=notes,
        manifest=manifest,
        describe_packed=describe_packed,
        count_reasons=True,
    )
