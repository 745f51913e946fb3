"""Every example config under configs/ runs (on its real dataset, Fashion-MNIST here) for two steps."""

import json
from pathlib import Path

import pytest

from fastflat.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
ON_THIS_MACHINE = [c for c in CONFIGS if "cifar" not in c.name]  # CIFAR needs a download: its configs are parsed only


def test_there_is_a_config_for_every_method_of_the_readme():
    names = {c.stem for c in CONFIGS if c.parent.name == "methods"}
    assert {"sgd", "sam", "sam-linf", "asam", "sam-m32", "swa", "swa-sam", "sse", "fge", "spartan-es",
            "spartan-grad", "es", "fullbatch"} <= names


@pytest.mark.parametrize("config", ON_THIS_MACHINE, ids=lambda c: f"{c.parent.name}/{c.name}")
def test_example_config_runs_two_steps(config, tmp_path, capsys):
    code = main(["train", "--config", str(config), "--max-steps", "2", "--subset", "1024", "--out", str(tmp_path),
                 "--name", "r"])  # a subset keeps BatchNorm re-estimation and fitness rounds short
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["test_acc"] is not None


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in ON_THIS_MACHINE], ids=lambda c: c.name)
def test_cifar_configs_resolve(config, capsys):
    assert main(["train", "--config", str(config), "--print-config"]) == 0
    assert "cifar10" in capsys.readouterr().out
