"""`fastflat soup`: uniform and greedy soups of fine-tunes from one pretrained run, against each ingredient
and their ensemble; a warning when the runs share no start; refusals before any work."""

import json

import pytest

from fastflat.cli import main

from helpers import one_line

COMMON = ["--dataset", "synthetic", "--subset", "256", "--batch-size", "32", "--val-split", "0.2", "--seed", "3"]


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("soup")
    assert main(["train", *COMMON, "--epochs", "2", "--out", str(folder), "--name", "pre"]) == 0
    for lr in ("0.01", "0.02", "0.05"):
        assert main(["train", *COMMON, "--init", str(folder / "pre"), "--epochs", "1", "--lr", lr,
                     "--out", str(folder), "--name", f"ft-{lr}"]) == 0
    return folder


def test_soups_of_fine_tunes_are_reported_beside_each_ingredient_and_the_ensemble(fine_tunes, tmp_path, capsys):
    runs = [str(fine_tunes / f"ft-{lr}") for lr in ("0.01", "0.02", "0.05")]
    capsys.readouterr()
    assert main(["soup", *runs, "--out", str(tmp_path), "--name", "s", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["warnings"] == [] and len(report["ingredients"]) == 3 and report["validation"]["size"] > 0
    assert report["uniform"]["members"] == runs and 0 < report["uniform"]["test"]["acc"] <= 100
    best = max(i["val_acc"] for i in report["ingredients"])
    assert report["greedy"]["val_acc"] >= best  # the greedy soup never does worse on validation than its first pick
    assert report["greedy"]["members"][0] == max(report["ingredients"], key=lambda i: i["val_acc"])["run"]
    assert set(report["ensemble"]["test"]) == {"acc", "nll", "ece"} and report["provenance"]["git_sha"]
    assert (tmp_path / "s" / "soup.json").exists() and (tmp_path / "s" / "soup.png").stat().st_size > 5000


def test_a_soup_of_one_run_twice_is_that_run(fine_tunes, tmp_path, capsys):
    run = str(fine_tunes / "ft-0.01")
    assert main(["soup", run, run, "--uniform-only", "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    alone, soup = report["ingredients"][0]["test"], report["uniform"]["test"]
    # the same weights; only BatchNorm differs (recomputed over the examples instead of the momentum average),
    # so a few of the 512 test examples may flip; a sum instead of a mean would wreck the accuracy
    assert soup["acc"] == pytest.approx(alone["acc"], abs=2.0) and "greedy" not in report


def test_runs_without_a_shared_start_get_a_warning(fine_tunes, tmp_path, capsys):
    assert main(["soup", str(fine_tunes / "pre"), str(fine_tunes / "ft-0.02"), "--out", str(tmp_path)]) == 0
    assert "not all fine-tuned from one --init checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [(["{pre}"], "at least two runs"), (["{pre}", "{pre}", "--val-split", "2"],
                                                                            "--val-split 2.0")])
def test_bad_soups_are_one_line(fine_tunes, tmp_path, capsys, args, says):
    argv = [a.format(pre=fine_tunes / "pre") for a in args]
    assert main(["soup", *argv, "--out", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err, says)
    assert not list(tmp_path.iterdir())


def test_runs_without_a_validation_split_need_one(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["train", "--dataset", "synthetic", "--subset", "64", "--batch-size", "32", "--epochs", "1", "--out", str(tmp_path),
                     "--name", name]) == 0
    capsys.readouterr()
    assert main(["soup", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 2
    one_line(capsys.readouterr().err, "hold out no validation split")
