"""The shared pieces under twinray/: the unknown-field check every YAML reader uses, and the CLI entry point."""

from __future__ import annotations

import pytest

from twinray.cli import InputError
from twinray.config import check_fields


def test_unknown_fields_are_named_in_one_line_with_the_known_ones():
    check_fields({"a": 1}, ["a", "b"], "x.yaml")  # nothing unknown: no error
    with pytest.raises(InputError) as raised:
        check_fields({"a": 1, "seed": 2}, ["b", "a"], "x.yaml", what="key")
    assert str(raised.value) == "x.yaml: unknown key 'seed' (known: a, b)"
    with pytest.raises(ValueError) as raised:
        check_fields({"z": 1, "y": 2}, ["a"], "r.yaml", what="recipe field", error=ValueError)
    assert str(raised.value) == "r.yaml: unknown recipe fields 'y', 'z' (known: a)"
