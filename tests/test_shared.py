"""The shared pieces under twinray/: the unknown-field check every YAML reader uses, and the CLI entry point."""

from __future__ import annotations

import pytest

from twinray.cli import InputError, run_cli
from twinray.config import check_fields


def test_unknown_fields_are_named_in_one_line_with_the_known_ones():
    check_fields({"a": 1}, ["a", "b"], "x.yaml")  # nothing unknown: no error
    with pytest.raises(InputError) as raised:
        check_fields({"a": 1, "seed": 2}, ["b", "a"], "x.yaml", what="key")
    assert str(raised.value) == "x.yaml: unknown key 'seed' (known: a, b)"
    with pytest.raises(ValueError) as raised:
        check_fields({"z": 1, "y": 2}, ["a"], "r.yaml", what="recipe field", error=ValueError)
    assert str(raised.value) == "r.yaml: unknown recipe fields 'y', 'z' (known: a)"


def test_run_cli_turns_an_input_error_into_one_line_and_exit_2(capsys):
    def main() -> int:
        raise InputError("data/x: no index")

    with pytest.raises(SystemExit) as exited:
        run_cli(main, prog="tool")
    assert exited.value.code == 2 and capsys.readouterr().err == "tool: error: data/x: no index\n"
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: int("x"), prog="tool", errors=(ValueError,))  # a library's ValueError, when the CLI asks
    assert exited.value.code == 2 and "tool: error: invalid literal" in capsys.readouterr().err
    with pytest.raises(InputError):  # without prog, the error is the caller's
        run_cli(main)


def test_a_yaml_file_that_is_missing_broken_or_not_a_mapping_is_one_line(tmp_path):
    from twinray.config import read_mapping

    (tmp_path / "ok.yaml").write_text("a: 1\n")
    assert read_mapping(tmp_path / "ok.yaml", "config") == {"a": 1}
    (tmp_path / "empty.yaml").write_text("")
    assert read_mapping(tmp_path / "empty.yaml", "config") == {}
    with pytest.raises(InputError, match=r"^config file .*nope.yaml does not exist$"):
        read_mapping(tmp_path / "nope.yaml", "config")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match=r"list.yaml: a recipe is a mapping of field: value$"):
        read_mapping(tmp_path / "list.yaml", "recipe", error=ValueError)
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(InputError, match=r"bad.yaml: not YAML \(ParserError at line 2, column 1\)$") as raised:
        read_mapping(tmp_path / "bad.yaml", "config")
    assert "\n" not in str(raised.value)
