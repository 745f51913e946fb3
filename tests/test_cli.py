"""The command line: help, a real run on synthetic data, eval, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from fastflat.cli import main

TINY = ["--dataset", "synthetic", "--epochs", "1"]


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_option_groups(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    for text in ("Method", "SAM", "Optimisation", "Data and model", "--sam-norm", "--label-noise"):
        assert text in out


def test_train_then_eval_a_checkpoint(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", *TINY, "--method", "sam", "--out", str(tmp_path), "--name", "r")
    assert code == 0 and "test accuracy" in out
    code, out, _ = run_cli(capsys, "eval", str(tmp_path / "r"), "--json")
    result = json.loads(out)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert code == 0 and result["test_acc"] == pytest.approx(summary["test_acc"])


@pytest.mark.parametrize("args, fragment", [
    (["train", "--method", "adam"], "'adam' is not one of 'sgd', 'sam'"),
    (["train", "--rho", "-1"], "sam.rho = -1.0"),
    (["train", "--lr", "0"], "lr = 0.0"),
    (["train", "--model", "resnet9000", *TINY], "resnet9000"),
    (["train", "--dataset", "imagenet"], "dataset = 'imagenet' is invalid: use one of fashion-mnist"),
    (["train", "--no-such-option"], "--no-such-option"),
    (["train", "--epochs", "many"], "--epochs"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path, args, fragment):
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err


def test_malformed_yaml_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: sam\n  rho: [\n")
    code, _, err = run_cli(capsys, "train", "--config", str(bad))
    assert code == 2 and "not valid YAML" in err and err.count("\n") == 1


def test_corrupt_checkpoint_is_one_line_and_left_alone(capsys, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "eval", str(ckpt))
    assert code == 2 and "unreadable" in err and ckpt.read_bytes() == b"not a checkpoint"


def test_missing_dataset_offline_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"),
                           "--out", str(tmp_path), "--device", "cpu")
    assert code == 2 and "cifar10" in err and err.count("\n") == 1


def test_resume_refuses_new_settings(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path), "--lr", "0.1")
    assert code == 2 and "--resume" in err


def test_console_script_entry_point_runs_as_a_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastflat", "train", "--lr", "-3"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: lr = -3.0") and "Traceback" not in proc.stderr


def test_ensemble_command_reports_and_plots_an_sse_run(capsys, tmp_path):
    code, _, _ = run_cli(capsys, "train", *TINY[:-1], "2", "--method", "sse", "--out", str(tmp_path), "--name", "s")
    assert code == 0
    code, out, _ = run_cli(capsys, "ensemble", "--sse", str(tmp_path / "s"), "--json", "--out", str(tmp_path))
    report = json.loads(out)
    assert code == 0 and len(report["members"]) == 2 and len(report["accuracy_by_size"]) == 2
    folder = next(tmp_path.glob("ensemble-sse-*"))  # a new directory named by the command
    assert (folder / "ensemble.json").exists() and (folder / "ensemble.png").exists()


def test_ensemble_of_independent_runs(capsys, tmp_path):
    for seed in ("0", "1"):
        assert run_cli(capsys, "train", *TINY, "--seed", seed, "--out", str(tmp_path), "--name", f"r{seed}")[0] == 0
    code, out, _ = run_cli(capsys, "ensemble", "--from", str(tmp_path / "r0"), "--from", str(tmp_path / "r1"),
                           "--out", str(tmp_path), "--name", "ind")
    assert code == 0 and "ensemble" in out and json.loads((tmp_path / "ind" / "ensemble.json").read_text())["kind"] == "final"


def test_budget_view_puts_each_run_at_its_budget(capsys, tmp_path):
    """B = the Ind runs' epochs; Ind at kB ensembles the first k; an SSE/FGE run of 2B lands at 2B."""
    def train_run(name, *extra):
        assert run_cli(capsys, "train", "--dataset", "synthetic", *extra, "--out", str(tmp_path), "--name", name)[0] == 0

    for seed in ("0", "1"):
        train_run(f"ind{seed}", "--epochs", "1", "--seed", seed)
    train_run("sse", "--epochs", "2", "--method", "sse")
    train_run("fge", "--epochs", "2", "--method", "fge", "--fge-cycle-epochs", "0.5")
    code, out, _ = run_cli(capsys, "ensemble", "--budgets", "--from", str(tmp_path / "ind0"), "--from",
                           str(tmp_path / "ind1"), "--sse", str(tmp_path / "sse"), "--fge", str(tmp_path / "fge"),
                           "--out", str(tmp_path), "--name", "budgets")
    assert code == 0 and "1B" in out and "2B" in out
    view = json.loads((tmp_path / "budgets" / "ensemble.json").read_text())
    assert view["budget_epochs"] == 1 and set(view["rows"]) == {"ind", "sse", "fge"}
    assert list(view["rows"]["sse"]) == ["2"] and list(view["rows"]["fge"]) == ["2"]
    assert view["rows"]["fge"]["2"]["per_run"][0]["members"] == 2  # 1 epoch of 0.5-epoch cycles after pretraining
    # each entry is the plain ensemble command's answer for the same runs
    run_cli(capsys, "ensemble", "--from", str(tmp_path / "ind0"), "--from", str(tmp_path / "ind1"), "--out", str(tmp_path), "--name", "i")
    run_cli(capsys, "ensemble", "--sse", str(tmp_path / "sse"), "--out", str(tmp_path), "--name", "s")
    ind, sse = (json.loads((tmp_path / f / "ensemble.json").read_text()) for f in ("i", "s"))
    assert view["rows"]["ind"]["2"]["error"] == pytest.approx(100 - ind["ensemble"]["acc"])
    assert view["rows"]["ind"]["1"]["error"] == pytest.approx(100 - ind["members"][0]["acc"])
    assert view["rows"]["sse"]["2"]["error"] == pytest.approx(100 - sse["ensemble"]["acc"])
    assert view["rows"]["sse"]["2"]["best_member_error"] == pytest.approx(100 - sse["best_member_acc"])
    assert (tmp_path / "budgets" / "ensemble.png").exists() and view["provenance"]["git_sha"]
    # --sse-keep 1: the SSE entry becomes its last snapshot alone; the best member still counts every snapshot
    run_cli(capsys, "ensemble", "--budgets", "--sse", str(tmp_path / "sse"), "--sse-keep", "1", "--out", str(tmp_path), "--name", "b1")
    only_last = json.loads((tmp_path / "b1" / "ensemble.json").read_text())["rows"]["sse"]["1"]  # no Ind: B = 2 epochs
    assert only_last["error"] == pytest.approx(100 - sse["members"][-1]["acc"])
    assert only_last["best_member_error"] == pytest.approx(100 - sse["best_member_acc"])
    assert only_last["per_run"][0]["members"] == 1 and only_last["per_run"][0]["collected"] == 2


def test_budget_view_rejects_a_run_off_the_budget_grid(capsys, tmp_path):
    for name, epochs in (("ind", "2"), ("sse", "3")):
        extra = ["--method", "sse"] if name == "sse" else []
        assert run_cli(capsys, "train", "--dataset", "synthetic", "--epochs", epochs, *extra,
                       "--out", str(tmp_path), "--name", name)[0] == 0
    code, _, err = run_cli(capsys, "ensemble", "--budgets", "--from", str(tmp_path / "ind"), "--sse", str(tmp_path / "sse"))
    assert code == 2 and "not a multiple of the budget B = 2 epochs" in err and err.count("\n") == 1


def test_sse_keep_auto_ensembles_the_last_k_best_on_validation(capsys, tmp_path):
    run = tmp_path / "sse"
    assert run_cli(capsys, "train", "--dataset", "synthetic", "--epochs", "3", "--method", "sse", "--sse-cycles", "3",
                   "--val-split", "0.2", "--label-noise", "0.4", "--out", str(tmp_path), "--name", "sse")[0] == 0
    code, out, _ = run_cli(capsys, "ensemble", "--sse", str(run), "--sse-keep", "auto", "--out", str(tmp_path), "--name", "auto")
    assert code == 0 and "validation (" in out
    auto = json.loads((tmp_path / "auto" / "ensemble.json").read_text())
    v, k = auto["validation"], auto["validation"]["best_k"]
    assert [m["member"].rsplit("/", 1)[1] for m in auto["members"]] == [f"snapshot-0{i}.pt" for i in range(4 - k, 4)]
    # the same k given by number is the same ensemble; every snapshot is scored on test for the pick alone
    run_cli(capsys, "ensemble", "--sse", str(run), "--sse-keep", str(k), "--out", str(tmp_path), "--name", "fixed")
    run_cli(capsys, "ensemble", "--sse", str(run), "--sse-keep", "0", "--out", str(tmp_path), "--name", "all")
    fixed, every = (json.loads((tmp_path / f / "ensemble.json").read_text()) for f in ("fixed", "all"))
    assert fixed["ensemble"] == pytest.approx(auto["ensemble"])
    picked = [m["member"] for m in every["members"]].index(v["best_member"])
    assert v["best_member_test"]["acc"] == pytest.approx(every["members"][picked]["acc"])
    assert v["member_acc"][picked] == max(v["member_acc"]) and len(v["member_acc"]) == 3
    # without a validation split there is nothing to choose on
    assert run_cli(capsys, "train", *TINY, "--method", "sse", "--out", str(tmp_path), "--name", "noval")[0] == 0
    code, _, err = run_cli(capsys, "ensemble", "--sse", str(tmp_path / "noval"), "--sse-keep", "auto")
    assert code == 2 and "trained without --val-split" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, says", [(["--budgets"], "needs runs"), (["--budgets", "--swa", "a"], "not --swa"),
                                        (["--fge", "a", "--sse-keep", "2"], "no --sse run"),
                                        (["--sse", "a", "--sse-keep", "two"], "or auto, not 'two'"),
                                        (["--budgets", "--sse", "a", "--sse-keep", "auto"], "takes a number")])
def test_ensemble_option_misuse_is_one_line(capsys, args, says):
    code, _, err = run_cli(capsys, "ensemble", *args)
    assert code == 2 and says in err and err.count("\n") == 1


@pytest.mark.parametrize("args", [[], ["--fge", "a", "--sse", "b"]])
def test_ensemble_needs_exactly_one_kind(capsys, args):
    code, _, err = run_cli(capsys, "ensemble", *args)
    assert code == 2 and "exactly one" in err


def test_ensemble_of_a_run_without_members_is_one_line(capsys, tmp_path):
    assert run_cli(capsys, "train", *TINY, "--out", str(tmp_path), "--name", "plain")[0] == 0
    code, _, err = run_cli(capsys, "ensemble", "--fge", str(tmp_path / "plain"))
    assert code == 2 and "no fge members" in err and err.count("\n") == 1


def test_bare_command_shows_the_commands_once(capsys):
    code, out, err = run_cli(capsys)
    assert code == 0 and out.count("Usage:") == 1 and "ensemble" in out and "bench" in out and not err


def test_train_takes_sse_keep_auto_and_matches_the_ensemble_command(capsys, tmp_path):
    """Last round `train --sse-keep auto` was refused while `ensemble --sse-keep auto` took it."""
    assert run_cli(capsys, "train", "--dataset", "synthetic", "--epochs", "3", "--method", "sse", "--sse-cycles", "3",
                   "--sse-keep", "auto", "--val-split", "0.2", "--out", str(tmp_path), "--name", "auto")[0] == 0
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    code, out, _ = run_cli(capsys, "ensemble", "--sse", str(tmp_path / "auto"), "--json", "--out", str(tmp_path / "e"))
    report = json.loads(out)
    assert code == 0 and summary["sse_keep"] == report["validation"]["best_k"] == len(report["members"])
    assert summary["ensemble"]["ensemble"]["acc"] == pytest.approx(report["ensemble"]["acc"])
    code, _, err = run_cli(capsys, "train", *TINY, "--method", "sse", "--sse-keep", "auto", "--out", str(tmp_path))
    assert code == 2 and "add --val-split" in err and err.count("\n") == 1
