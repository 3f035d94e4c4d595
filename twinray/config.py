"""Checks shared by every YAML file the project reads (pretrain configs, recipes, scans)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
