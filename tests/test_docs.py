"""The user's door: the README stays short enough to read, and every file the README and docs/ point to
(links and benchmark results) exists in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_under_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_file_a_page_names_exists(page):
    text = page.read_text()
    links = [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if not m.startswith("http")]
    results = re.findall(r"benchmarks/results/[\w./-]+\.(?:json|csv|png|txt)", text)
    missing = [name for name in links if not (page.parent / name).exists()]
    missing += [name for name in results if not (ROOT / name).exists()]
    assert not missing, f"{page.name} names files that do not exist: {missing}"
