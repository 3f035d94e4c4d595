"""Reading what a user brings, the same way for every dataset: folder trees (symbolic links followed, loops cut,
names that are not UTF-8 escaped) and label tables (CSV with or without a BOM, any line ending, Windows paths,
missing values in their usual spellings, one value never two classes), with repeated entries merged."""

from __future__ import annotations

import codecs
import csv
import io
import os
import posixpath
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from twinray.cli import InputError

T = TypeVar("T")

# How a label table says "no value": pandas' default `na_values` (pandas.read_csv), plus "?" and "missing". A cell
# is missing when, stripped of blanks, it is one of these in any case. "-" is not among them: +/- is a labelling.
MISSING_VALUES = frozenset(
    spelling.casefold()
    for spelling in (
        *("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>"),
        *("N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"),
        *("?", "missing"),
    )
)


def printable_name(name: str) -> str:
    """A name from the file system -> text that is valid UTF-8, for the manifest and messages. Bytes that are not
    UTF-8 (Python holds them as surrogate escapes: latin-1 b'caf\\xe9.png' is 'caf\\udce9.png') are written as
    a visible escape, 'caf\\\\xe9.png'; every other name is returned as it is."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def label_value(cell: str) -> str | None:
    """A label or patient cell -> its text stripped of surrounding blanks and in Unicode NFC (composed and
    decomposed accents are one spelling), or None when the cell is missing (empty or a MISSING_VALUES spelling)."""
    text = cell.strip()
    return None if text.casefold() in MISSING_VALUES else unicodedata.normalize("NFC", text)


def label_key(label: str) -> Hashable:
    """What a reader takes a label for: a number by its value ('1', '1.0' and '01' are 1.0), else its text without
    regard to case or runs of blanks ('Normal', 'NORMAL' and 'normal ' are 'normal')."""
    try:
        return float(label)
    except ValueError:
        return " ".join(label.casefold().split())


def check_spellings(labels: Iterable[tuple[str, str]], what: str) -> None:
    """Raises InputError when two different (label, where) spellings read as one value (`label_key`): they would
    become two classes. The line names `what` (the CSV and column, or the class folders), both spellings and where
    each was first seen (CSV:LINE, a folder)."""
    first: dict[Hashable, tuple[str, str]] = {}
    for label, where in labels:
        seen, seen_where = first.setdefault(label_key(label), (label, where))
        if seen != label:
            raise InputError(
                f"{what}: {seen!r} ({seen_where}) and {label!r} ({where}) are two spellings of one value, which "
                "would make two classes; write it one way"
            )


def file_id(path: str | Path) -> tuple:
    """What makes two paths one file: (device, inode) after following links. A dangling link is its own file."""
    try:
        stat = os.stat(path)
    except OSError:
        return ("unresolved", os.path.abspath(path))
    return (stat.st_dev, stat.st_ino)


def walk_files(
    root: Path, ignored: Iterable[str] = (), seen_folders: Iterable[Path] = ()
) -> tuple[list[Path], list[dict], int]:
    """Every file under `root`, following symbolic links to folders and files.

    A folder is entered once, however many links lead to it, so a link to an ancestor (a loop) or to a folder
    already walked adds nothing; `seen_folders` (besides `root`) are never entered, e.g. the dataset root and the
    other class folders. Names starting with "." and folders named in `ignored` are passed over. A file reached
    twice (two links, or a hard link) is listed once: under the path that needs no link, else the first sorted.
    Returns (files as reached under `root`, sorted; folders that could not be read as skip entries
    {"source", "reason"} with paths relative to `root`; how many repeated files were dropped)."""
    ignored = set(ignored)
    visited = {file_id(root), *(file_id(p) for p in seen_folders)}
    found: dict[tuple, list[Path]] = {}
    skipped = []

    def unreadable(error: OSError) -> None:
        where = Path(error.filename).relative_to(root).as_posix() if error.filename else root.as_posix()
        where = printable_name(where)
        skipped.append({"source": where + "/", "reason": f"folder not readable ({error.strerror or error})"})

    for folder, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            if name.startswith(".") or name in ignored:
                continue
            key = file_id(os.path.join(folder, name))
            if key not in visited:
                visited.add(key)
                kept.append(name)
        dirnames[:] = kept  # os.walk descends only into these, in this order
        for name in filenames:
            if not name.startswith("."):
                path = Path(folder, name)
                found.setdefault(file_id(path), []).append(path)
    # Of the paths to one file, the one reached without links, else the first in sorted order.
    files = [
        paths[0] if len(paths) == 1 else min(paths, key=lambda p: (os.path.realpath(p) != os.path.abspath(p), p))
        for paths in found.values()
    ]
    repeats = sum(len(paths) - 1 for paths in found.values())
    return sorted(files), skipped, repeats


def normalize_path(text: str) -> str:
    """A path cell as written by any exporter -> a POSIX path: backslashes become slashes, `./` and `a/../` are
    folded, surrounding blanks dropped. An empty cell gives ""."""
    text = text.strip().replace("\\", "/")
    return posixpath.normpath(text) if text else ""


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Excel's "Unicode text"
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is dropped, not glued to the first name
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as CSV UTF-8"
        ) from None


def read_table(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict]], list[dict]]:
    """A CSV label table -> (header, [(line number, {column: cell})], skip entries).

    Reads UTF-8 with or without a BOM (and UTF-16 with one), and LF, CRLF or CR line endings. Header names are
    stripped of blanks. Rows whose cells are all empty are ignored; a row with more or fewer cells than the header
    (extra empty cells excepted) is skipped by line, as "NAME:LINE" (`printable_name`). Raises InputError for a
    missing or unreadable file, or a header without the `required` columns."""
    if not path.is_file():
        raise InputError(f"{path}: no such CSV file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    reader = csv.reader(io.StringIO(_decode(path, data), newline=""))
    rows, skipped = [], []
    try:
        header = [name.strip() for name in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            found = ", ".join(header) or "nothing"
            raise InputError(f"{path}: missing column(s) {', '.join(missing)} (found: {found})")
        line = reader.line_num
        for cells in reader:
            start, line = line + 1, reader.line_num
            while len(cells) > len(header) and not cells[-1].strip():
                cells = cells[:-1]
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                reason = f"{len(cells)} cells where the header has {len(header)}"
                skipped.append({"source": f"{printable_name(path.name)}:{start}", "reason": reason})
                continue
            rows.append((start, dict(zip(header, cells))))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: not a readable CSV ({e})") from None
    return header, rows, skipped


def merge_repeats(
    items: Sequence[T],
    key: Callable[[T], Hashable],
    value: Callable[[T], dict],
    where: Callable[[T], str],
    conflict: str = "listed twice with different labels",
    name: Callable[[T], str] | None = None,
) -> tuple[list[T], int]:
    """Keeps the first of the items that share a key (one file listed twice is one sample) and counts the rest.

    Raises InputError when repeats disagree on `value` (labels, split, patient): neither can be trusted, and
    keeping both would put one image in two splits. The line names the file (the key, or `name`), both places
    (`where`: a path, or CSV:LINE) and the fields that differ."""
    first: dict[Hashable, T] = {}
    kept = []
    for item in items:
        k = key(item)
        if k not in first:
            first[k] = item
            kept.append(item)
            continue
        a, b = _flat(value(first[k])), _flat(value(item))
        if a != b:
            fields = [f for f in dict.fromkeys([*a, *b]) if a.get(f) != b.get(f)]
            says_a = ", ".join(f"{f}={a.get(f)}" for f in fields)
            says_b = ", ".join(f"{f}={b.get(f)}" for f in fields)
            shown = name(item) if name else k
            raise InputError(f"{shown}: {conflict} ({where(first[k])}: {says_a}; {where(item)}: {says_b})")
    return kept, len(items) - len(kept)


def _flat(values: dict) -> dict:
    """{"labels": {"Edema": 1}, "sex": "F"} -> {"Edema": 1, "sex": "F"}, for naming the fields that differ."""
    flat = {}
    for field, value in values.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[field] = value
    return flat
