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
    (["train", "--method", "adam"], "method = 'adam'"),
    (["train", "--rho", "-1"], "sam.rho = -1.0"),
    (["train", "--lr", "0"], "lr = 0.0"),
    (["train", "--model", "resnet9000", *TINY], "resnet9000"),
    (["train", "--dataset", "imagenet"], "imagenet"),
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
