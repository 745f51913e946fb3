"""Methods from other packages: the example in docs/plugins.md, installed from the page itself into a
folder of its own, is found through the `fastflat.methods` entry points, listed by --help and trained."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)


def test_the_page_holds_exactly_one_pyproject_and_one_module():
    assert len(_blocks("toml")) == 1 and len(_blocks("python")) == 1
    assert 'example-sgd = "fastflat_example_plugin:ExampleSGD"' in _blocks("toml")[0]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example built and installed (no dependencies, no download) into its own site folder."""
    source, site = tmp_path_factory.mktemp("plugin-src"), tmp_path_factory.mktemp("plugin-site")
    (source / "pyproject.toml").write_text(_blocks("toml")[0])
    (source / "fastflat_example_plugin.py").write_text(_blocks("python")[0])
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return site


def _fastflat(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fastflat", *args], capture_output=True, text=True, env=env)


def test_train_help_lists_the_plugin_and_its_option(plugin_site):
    shown = _fastflat(plugin_site, "train", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "example-sgd" in shown.stdout and "--example-sgd-shrink" in shown.stdout


def test_the_plugin_trains_from_the_command_line(plugin_site, tmp_path):
    done = _fastflat(plugin_site, "train", "--method", "example-sgd", "--example-sgd-shrink", "0.001",
                     "--dataset", "synthetic", "--epochs", "1", "--subset", "256", "--batch-size", "64",
                     "--out", str(tmp_path), "--name", "plugin")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "plugin" / "summary.json").read_text())
    assert summary["method"] == "example-sgd" and summary["steps"] == 4
    assert summary["config"]["example_sgd"] == {"shrink": 0.001}


def test_the_plugins_own_check_refuses_a_bad_value(plugin_site, tmp_path):
    done = _fastflat(plugin_site, "train", "--method", "example-sgd", "--example-sgd-shrink", "2",
                     "--dataset", "synthetic", "--out", str(tmp_path))
    assert done.returncode == 2 and "example_sgd.shrink = 2.0 is invalid: must be in [0, 1)" in done.stderr
    assert not any(tmp_path.iterdir())


def test_without_the_plugin_the_method_is_unknown(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastflat", "train", "--method", "example-sgd", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "example-sgd" in done.stderr


def test_a_broken_plugin_is_named_and_left_out_without_stopping_fastflat(tmp_path):
    """Entry points that fail to import, name another class, or take a built-in's name: one line each."""
    site = tmp_path / "site"
    info = site / "broken_plugins-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fastflat.methods]\nmissing = no_such_module:Method\n"
                                          "sam = fastflat.methods.sam:SAM\nwrong = fastflat.methods.sgd:SGD\n")
    shown = _fastflat(site, "train", "--help")
    assert shown.returncode == 0
    for name, why in (("missing", "does not load (ModuleNotFoundError"), ("sam", "takes the name of another method"),
                      ("wrong", "says name = 'sgd'")):
        assert f"method plugin '{name}'" in shown.stderr and why in shown.stderr
    assert "Traceback" not in shown.stderr
