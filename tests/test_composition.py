"""Wrappers compose or refuse: `--swa` over every method either reports the average it took or is
refused with exit 2 and the reason before any run directory exists; never exit 0 with --swa dropped."""

import json

import pytest

from fastflat.cli import main
from fastflat.methods import BUILTIN, registry
from helpers import train_runs

TINY = ["--dataset", "synthetic", "--subset", "128", "--batch-size", "32", "--epochs", "2",
        "--swa-start", "0.25", "--swa-cycle", "1"]
EXTRA = {  # what each method needs to run a few steps on the tiny set
    "fullbatch": ["--epochs", "4", "--chunk-size", "64"],
    "spartan": ["--fitness-examples", "32", "--children", "4"],
    "es": ["--children", "4"],
    "sse": [], "fge": [], "swa": [], "sgd": [], "sam": [],
    "curve": ["--curve-start", "{ends}/a", "--curve-end", "{ends}/b"],
    "ema": ["--ema", "0.9"],
    "lawa": ["--lawa", "2"],
}
COMPOSE = {"sgd", "sam", "fullbatch", "spartan", "swa"}  # --swa averages these; the others refuse
REFUSE = {"es": "ES steps by --es-lr", "curve": "a curve trains a bend", "sse": "snapshot ensembles set their own",
          "fge": "FGE sets its own", "ema": "an EMA delivers its own average", "lawa": "LAWA delivers its own average"}
EMA_COMPOSES = {"sgd", "sam", "fullbatch", "spartan", "es", "sse", "fge", "ema"}  # --ema averages these
EMA_REFUSES = {"swa": "ema and swa each deliver an average", "curve": "--ema cannot average --method curve",
               "lawa": "ema and lawa each deliver an average"}


def test_every_builtin_method_is_in_the_table():
    assert {cls.name for cls in BUILTIN} == COMPOSE | set(REFUSE) == set(EXTRA)


@pytest.fixture(scope="module")
def ends(tmp_path_factory):
    """Two trained runs for the curve's end points."""
    folder = tmp_path_factory.mktemp("ends")
    train_runs(folder, "a", "b")
    return folder


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_swa_over_each_method_averages_or_is_refused(method, ends, tmp_path, capsys):
    extra = [arg.format(ends=ends) for arg in EXTRA[method]]
    code = main(["train", "--method", method, "--swa", *TINY, *extra, "--out", str(tmp_path / "runs"), "--name", "r"])
    err = capsys.readouterr().err
    if method in COMPOSE:
        assert code == 0, err
        summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
        assert summary["swa_models_averaged"] >= 2 and summary["swa_acc"] is not None
    else:
        assert code == 2 and f"--swa cannot average --method {method}: {REFUSE[method]}" in err
        assert not (tmp_path / "runs").exists()


def test_every_builtin_method_is_in_the_ema_table():
    assert {cls.name for cls in BUILTIN} == EMA_COMPOSES | set(EMA_REFUSES)


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_ema_over_each_method_averages_or_is_refused(method, ends, tmp_path, capsys):
    extra = [arg.format(ends=ends) for arg in EXTRA[method] if arg != "--ema" and arg != "0.9"]
    code = main(["train", "--method", method, "--ema", "0.9", *TINY[:8], *extra, "--out", str(tmp_path / "runs"),
                 "--name", "r"])
    err = capsys.readouterr().err
    if method in EMA_COMPOSES:
        assert code == 0, err
        summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
        assert summary["delivered"] == "ema" and summary["ema_updates"] >= 2 and summary["ema_acc"] is not None
    else:
        assert code == 2 and EMA_REFUSES[method] in err
        assert not (tmp_path / "runs").exists()


def test_swa_over_spartan_keeps_the_mutation_rounds(tmp_path):
    assert main(["train", "--method", "spartan", "--swa", *TINY, *EXTRA["spartan"], "--out", str(tmp_path),
                 "--name", "r"]) == 0
    rounds = (tmp_path / "r" / "evolution.jsonl").read_text().splitlines()
    assert len(rounds) == 2  # one mutation round per epoch under SWA too


def test_registry_classes_declare_a_refusal_or_none():
    for name, cls in registry().items():
        assert cls.swa_refusal is None or len(cls.swa_refusal) > 20, name
