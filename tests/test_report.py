"""`fastflat report`: one self-contained HTML page of runs and results, opened in headless Chromium."""

import json
import re
import shutil
import subprocess

import pytest

from fastflat.cli import main

from helpers import one_line, train_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two tiny runs, the ensemble of both, and the report page of all three."""
    folder = tmp_path_factory.mktemp("study")
    train_runs(folder, "a", "b")
    assert main(["ensemble", "--from", str(folder / "a"), "--from", str(folder / "b"), "--out", str(folder),
                 "--name", "ens"]) == 0
    assert main(["report", str(folder / "a"), str(folder / "b"), str(folder / "ens"), "--out", str(folder),
                 "--name", "page"]) == 0
    return folder


def test_the_page_holds_every_table_and_figure_inline(study):
    page = (study / "page" / "report.html").read_text()
    figures = [p for run in ("a", "b", "ens") for p in (study / run).glob("*.png")]
    assert len(figures) >= 3 and page.count("src='data:image/png;base64,") == len(figures)
    assert not re.search(r"src=['\"](?!data:)", page)  # nothing fetched from elsewhere: self-contained
    assert "Runs side by side" in page and page.count("<h2>") == 4  # the comparison, then a, b, ens
    summary = json.loads((study / "a" / "summary.json").read_text())
    assert f"{summary['test_acc']:.4g}" in page and "Per epoch" in page and "ensemble" in page


def test_a_folder_that_is_not_a_directory_is_one_line(study, tmp_path, capsys):
    assert main(["report", str(study / "a" / "summary.json"), "--out", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err, "is not a directory")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_the_page_opens_in_headless_chromium_with_every_image_shown_and_no_console_message(study):
    page = study / "page" / "report.html"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    shown = re.search(r'data-images-shown="(\d+)/(\d+)"', done.stdout)
    assert shown, done.stdout[:500] + done.stderr[-2000:]
    assert int(shown.group(1)) == int(shown.group(2)) >= 3
    assert "CONSOLE" not in done.stderr, [line for line in done.stderr.splitlines() if "CONSOLE" in line]
