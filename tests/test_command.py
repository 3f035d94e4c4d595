"""The `twinray` command (twinray/command.py) in this process, and the package list it is installed from."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

from setuptools.config.pyprojecttoml import load_file  # the reader the build uses (any Python)

from tests.conftest import REPO, assert_one_line_error
from twinray.command import BENCHMARKS, BUILTIN, TOOLS, main
from twinray.prep.cli import describe
from twinray.prep.format import PackedDataset

# Every tool the issue asked for (issue 21); TOOLS may hold more, never fewer.
ASKED = ["prep", "pretrain", "finetune", "scan", "gradcam", "lr-find", "preview", "bench", "study-real", "configs"]
# Modules with a `__main__` block that are not subcommands, and why.
NOT_COMMANDS = {"twinray.prep.real_cxr": "a step of study-real (its CSV), run by train/study_real.py"}


def test_help_lists_every_command_with_one_sentence(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert list(rows) == [*TOOLS, *BUILTIN]
    assert set(ASKED) <= set(rows)
    assert all(sentence.endswith(".") and sentence.count(". ") == 0 for sentence in rows.values()), rows


def test_help_imports_no_tool():
    """`twinray --help` imports only the dispatcher: no tool module, no torch (each tool is imported when chosen)."""
    code = (
        "import sys; from twinray.command import main; main(['--help']);"
        "print(sorted(m for m in sys.modules if m.startswith(('twinray', 'torch', 'numpy'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "['twinray', 'twinray.cli', 'twinray.command']"


def test_unknown_command_is_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "twinray", "nosuch"], capture_output=True, text=True, cwd=REPO)
    assert_one_line_error(result, "twinray: error: unknown command 'nosuch'", "prep, pretrain")
    assert result.stdout == ""


def test_no_command_is_one_line_exit_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinray: error: a command is required: prep, pretrain,") and err.count("\n") == 1


def test_prep_info_is_prep_main(covid_packed, capsys):
    assert main(["prep", "info", str(covid_packed)]) == 0
    assert capsys.readouterr().out == describe(PackedDataset(covid_packed)) + "\n"


def test_a_tools_bad_input_keeps_its_one_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["prep", "info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prep: error: ") and str(missing) in err and err.count("\n") == 1
    # argparse's errors: the tool's own one-line parser, exit 2 returned rather than raised
    assert main(["prep", "info"]) == 2
    err = capsys.readouterr().err
    assert "error: the following arguments are required: dir" in err and err.count("\n") == 1


def test_a_tools_error_types_are_its_main_blocks(tmp_path, capsys):
    """scan's `__main__` block turns a ConfigError into one line; so does `twinray scan`."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nout: y\nnosuch_field: 1\n")
    assert main(["scan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scan: error: ") and "nosuch_field" in err and err.count("\n") == 1


def _main_block(module: str) -> tuple[str | None, tuple[str, ...]] | None:
    """(prog, error names) of the run_cli call in `module`'s `if __name__ == "__main__":` block (a `__main__`
    module: at its top level); None without one."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    body = tree.body if module.endswith(".__main__") else []
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            body = node.body
    for node in body:
        call = node.value if isinstance(node, ast.Expr) else None
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "run_cli":
            assert ast.unparse(call.args[0]) == "main", module
            kwargs = {k.arg: k.value for k in call.keywords}
            prog = call.args[1] if len(call.args) > 1 else kwargs.get("prog")
            errors = kwargs.get("errors")
            return (prog.value if prog else None, tuple(ast.unparse(e) for e in errors.elts) if errors else ())
    return None


def test_every_tool_is_its_main_block():
    """Each subcommand handles errors as its script does, and every script with a `__main__` block is a
    subcommand (or in NOT_COMMANDS, with a reason)."""
    for tool in [*TOOLS.values(), *BENCHMARKS.values()]:
        if tool.module == "twinray.prep.cli":  # prep's block is prep/__main__.py: run_cli(main)
            assert _main_block("twinray.prep.__main__") == (None, ())
            continue
        assert _main_block(tool.module) == (tool.prog, tool.errors), tool.module
    packages = {"train": "twinray.train", "pipelines": "twinray.pipelines", "bench": "twinray.bench"}
    scripts = {
        f"{package}.{path.stem}"
        for folder, package in packages.items()
        for path in (REPO / folder).glob("*.py")
        if path.stem != "__init__" and _main_block(f"{package}.{path.stem}")
    }
    scripts |= {f"twinray.prep.{p.stem}" for p in (REPO / "prep").glob("*.py") if p.stem not in ("__main__", "cli")
                if _main_block(f"twinray.prep.{p.stem}")}  # fmt: skip
    listed = {tool.module for tool in [*TOOLS.values(), *BENCHMARKS.values()]}
    assert scripts - listed == set(NOT_COMMANDS)


def test_bench_names_and_errors(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  ")] == list(BENCHMARKS)
    assert main(["bench", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinray bench: error: unknown benchmark 'nosuch'; choose from augment_order,")
    assert err.count("\n") == 1
    # a benchmark's main() takes no arguments: it parses sys.argv, which the dispatcher sets
    assert main(["bench", "resources", "--resolutions", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinray bench resources: error: argument --resolutions: '0'") and err.count("\n") == 1


def test_configs_lists_prints_and_copies(tmp_path, capsys):
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [p.stem for p in shipped]
    assert lines[0].split(None, 1)[1] == (REPO / "configs" / "demo-scan.yaml").read_text().splitlines()[0][2:]

    assert main(["configs", "demo-scan"]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / "demo-scan.yaml").read_text()

    assert main(["configs", "scan-freeze.yaml", "--copy", str(tmp_path / "mine")]) == 0
    copy = tmp_path / "mine" / "scan-freeze.yaml"
    assert capsys.readouterr().out == f"wrote {copy}\n"
    assert copy.read_bytes() == (REPO / "configs" / "scan-freeze.yaml").read_bytes()

    copy.write_text("edited\n")  # a copy the user changed is kept without --force
    assert main(["configs", "scan-freeze", "--copy", str(tmp_path / "mine")]) == 2
    assert capsys.readouterr().err == f"twinray configs: error: {copy} exists; pass --force to replace it\n"
    assert copy.read_text() == "edited\n"
    assert main(["configs", "scan-freeze", "--copy", str(tmp_path / "mine"), "--force"]) == 0
    assert copy.read_bytes() == (REPO / "configs" / "scan-freeze.yaml").read_bytes()
    assert [p.name for p in copy.parent.iterdir()] == ["scan-freeze.yaml"]  # no temporary file left

    assert main(["configs", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinray configs: error: no shipped config 'nosuch'; there are: demo-scan, ")
    assert main(["configs", "../pyproject.toml"]) == 2  # only the shipped files
    assert "no shipped config '../pyproject.toml'" in capsys.readouterr().err


def test_every_package_is_listed():
    """pyproject's package list names every folder with an __init__.py under the mapped folders: a wheel built from
    it holds every sub-package (tests/test_wheel.py installs one)."""
    setuptools = load_file(REPO / "pyproject.toml")["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join([name, *parts]))
    data = {name for name, globs in setuptools["package-data"].items() if "*.yaml" in globs}
    assert data == {"twinray.configs"}
    assert sorted(setuptools["packages"]) == sorted(found | data)


def test_the_tests_in_process_runner_keeps_what_a_process_prints_on_stderr(capsys, monkeypatch):
    """tests/conftest.py twinray_here, which most tool tests use instead of a subprocess: a warning and a log record
    reach its stderr, as a process prints them, so a one-line check still fails on them; a DeprecationWarning, which
    a process hides, does not."""
    import logging
    import types
    import warnings

    from tests.conftest import twinray_here
    from twinray.command import Tool

    def probe(argv):
        warnings.warn("a user warning", stacklevel=1)
        warnings.warn("a deprecation", DeprecationWarning, stacklevel=1)
        logging.getLogger("probe").warning("a log record")
        sys.stderr.write(f"probe: error: {argv[0]}\n")
        return 2

    monkeypatch.setitem(sys.modules, "probe_tool", types.SimpleNamespace(main=probe))
    monkeypatch.setitem(TOOLS, "probe", Tool("probe_tool", "a tool that warns", "probe"))
    result = twinray_here(capsys, "probe", "bad")
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == "probe: error: bad"
    assert "UserWarning: a user warning" in result.stderr and "a log record" in result.stderr
    assert "a deprecation" not in result.stderr
    monkeypatch.setitem(sys.modules, "probe_tool", types.SimpleNamespace(main=lambda argv: 0))
    assert twinray_here(capsys, "probe").stderr == ""
