"""The README and the docs beside it: every relative link resolves, and the study tables in docs/results.md are the
committed results files' rows (bench/results/study-real/<profile>/table.md), not copies that drifted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(page: Path) -> list[str]:
    """The relative link targets of a page, outside code blocks."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target}"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: {target}"


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make demo" in readme and "make test" in readme
    assert "![" in readme  # one picture, which the link test above finds on disk


def table_rows(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")}


@pytest.mark.parametrize("profile", ["cpu", "quick"])
def test_results_page_tables_are_the_committed_rows(profile):
    """Each study row in docs/results.md (init spelled out, shortcut counts in brackets) is a row of the profile's
    committed table.md, and all of that file's rows are on the page."""
    committed = table_rows((REPO / "bench" / "results" / "study-real" / profile / "table.md").read_text())
    page = (REPO / "docs" / "results.md").read_text()
    section = page.split(f"(profile `{profile}`)", 1)[1].split("\n### ", 1)[0]
    shown = set()
    for row in table_rows(section):
        row = row.replace("| Barlow Twins |", "| barlow |", 1)
        row = re.sub(r"^\| (\w+) \((\d+)\) \|", r"| \1 | \2 |", row)  # "statistics (25)" -> "statistics | 25"
        shown.add(row)
    data_rows = {
        r
        for r in committed
        if r.startswith(("| barlow ", "| random ", "| statistics ", "| border ", "| geometry ", "| all "))
    }
    assert len(data_rows) == 20
    assert data_rows <= shown


def test_readme_headline_study_figures_are_in_the_results_file():
    readme = (REPO / "README.md").read_text()
    committed = (REPO / "bench" / "results" / "study-real" / "cpu" / "table.md").read_text()
    for figure in ["0.620 ± 0.053", "0.476 ± 0.211"]:
        assert figure in readme and figure in committed
    assert "| all | 58 | 0.848 " in committed and "0.848" in readme


def test_licence_and_citation():
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2026 the twinray authors\n")
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    assert citation["license"] == "MIT"
    assert [r["title"] for r in citation["references"]] == [
        "AIDL Final Project: Self-supervised learning for medical imaging",
        "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
    ]
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert citation["version"] == version
    assert f"## {version} - " in (REPO / "CHANGELOG.md").read_text()
