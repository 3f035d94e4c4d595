"""No import cycle between first-party modules, and no first-party import hidden inside a function without a reason.

The module graph is built from the source (an AST walk, nothing imported) over the folders that pyproject.toml's
package-dir maps to `twinray.*`. An edge is a top-level import (module level, or in a class body; `if
TYPE_CHECKING:` blocks left out, as they never run). A function-local first-party import is allowed only with a
comment on its line, or the line above, that says why it stays lazy (docs/architecture.md, "Imports")."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# pyproject.toml [tool.setuptools] package-dir, less configs/ (data only)
PACKAGE_DIRS = {"twinray": "twinray", "twinray.prep": "prep", "twinray.pipelines": "pipelines"}
PACKAGE_DIRS |= {"twinray.train": "train", "twinray.bench": "bench"}
LAZY_WORDS = ("lazy", "optional", "extra", "heavy", "only when", "on demand")


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every first-party module (a package is its __init__.py)."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.setdefault(".".join([package, *parts]), path)
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> set[str]:
    """The first-party modules an import statement runs: `from a.b import c` is a.b, or a.b.c where c is a module;
    every package above them runs its __init__ too, except the packages above `module`, which are importing already
    (a submodule that imports its sibling does not wait for its own package)."""
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = _absolute(node, module, is_package)
        names = [source] + [f"{source}.{alias.name}" for alias in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if prefix in modules and prefix != module and not module.startswith(prefix + "."):
                out.add(prefix)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.Module):
    """(import node, inside a function) for every import of a module, top level first."""

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from visit(
                child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            )

    yield from visit(tree, False)


def _graph():
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    local: list[tuple[Path, int, str]] = []  # function-local first-party imports: file, line, module
    for name, path in modules.items():
        text = path.read_text()
        lines = text.splitlines()
        is_package = path.name == "__init__.py"
        for node, in_function in _walk(ast.parse(text, str(path))):
            targets = _targets(node, name, is_package, modules)
            if not targets:
                continue
            if in_function:
                comment = " ".join(lines[node.lineno - 2 : node.end_lineno]).lower()
                if "#" not in comment or not any(word in comment for word in LAZY_WORDS):
                    local.append((path.relative_to(REPO), node.lineno, ", ".join(sorted(targets))))
            else:
                edges[name] |= targets
    return edges, local


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walk_finds_the_modules_and_their_imports():
    edges, _ = _graph()
    assert "twinray.prep.format" in edges and "twinray.pipelines.loader" in edges
    assert "twinray.cli" in edges["twinray.prep.format"]  # format raises the CLI's InputError


def test_the_cycle_finder_names_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_first_party_modules():
    cycle = _cycle(_graph()[0])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_local_first_party_imports_say_why_they_are_lazy():
    _, local = _graph()
    listed = "\n".join(f"  {path}:{line}: {targets}" for path, line, targets in local)
    assert not local, (
        "first-party imports inside functions without a comment saying why they stay lazy (move them to the top, "
        f"or say which optional dependency they keep from loading):\n{listed}"
    )
