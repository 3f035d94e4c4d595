"""Checks shared by every YAML file the project reads (pretrain configs, recipes, scans)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from twinray.cli import InputError


def check_fields(
    data: Mapping, known: Iterable[str], where: str, what: str = "field", error: type[Exception] = InputError
) -> None:
    """Raises `error` (InputError unless the caller's own type is given) in one line when `data` has keys outside
    `known`: "{where}: unknown {what} 'x' (known: a, b, ...)", every unknown key named, sorted."""
    known = sorted(known)
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        names = ", ".join(repr(k) for k in unknown)
        raise error(f"{where}: unknown {what}{plural} {names} (known: {', '.join(known)})")


def read_mapping(path: str | Path, what: str, error: type[Exception] = InputError) -> dict:
    """A YAML file's top-level mapping ({} for an empty file). Raises `error` in one line naming the file when it
    is missing, is not YAML, or holds something other than a mapping; `what` names the kind of file ("config")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise error(f"{path}: not YAML ({type(e).__name__}{where})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: a {what} is a mapping of field: value")
    return data
