"""What a practitioner reaches for first: --version, -h, --print-config, --max-steps, fastflat runs,
--resume auto, and output that reads well when piped to a file."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from fastflat.cli import main
from fastflat.config import load_config
from fastflat.errors import NonFiniteError
from fastflat.loop import train

from helpers import StopAt

TINY = ["--dataset", "synthetic", "--epochs", "1"]


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_short_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("fastflat 0.")
    for argv in (["-h"], ["train", "-h"], ["landscape", "plane", "-h"]):
        code, out, _ = run_cli(capsys, *argv)
        assert code == 0 and "Usage" in out


HELPS = [["train"], ["curve"], ["landscape", "plane"], ["landscape", "line"], ["landscape", "rays"], ["sharpness"],
         ["toy"], ["ensemble"], ["soup"], ["runs"], ["report"], ["bench", "train"], ["bench", "kernels"]]


@pytest.mark.parametrize("columns", ["80", "60"])
def test_help_never_cuts_an_option_name(capsys, monkeypatch, columns):
    """In 80 columns Rich cut 8 of train's option names (--checkpoint-eve…): names that cannot be copied."""
    import typer

    from fastflat.cli import app

    monkeypatch.setenv("COLUMNS", columns)
    for argv in HELPS:
        code, out, _ = run_cli(capsys, *argv, "-h")
        assert code == 0 and "…" not in out, f"{argv}: {[line for line in out.splitlines() if '…' in line]}"
        command = typer.main.get_command(app)
        for name in argv:
            command = command.commands[name]
        names = [opt for p in command.params if p.param_type_name == "option" for opt in (*p.opts, *p.secondary_opts)]
        assert names and (argv != ["train"] or len(names) > 50)  # the options were found
        missing = [n for n in names if n.startswith("--") and n not in out]
        assert not missing, f"{argv}: {missing} not shown whole"


def test_print_config_prints_the_resolved_yaml_and_writes_nothing(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--method", "sam", "--rho", "0.1", "--out", str(tmp_path), "--print-config")
    config = yaml.safe_load(out)
    assert code == 0 and config["method"] == "sam" and config["sam"]["rho"] == 0.1 and config["epochs"] == 3
    assert list(tmp_path.iterdir()) == []
    assert "spartan" not in config and "swa" not in config  # only the sections this run reads
    code, out, _ = run_cli(capsys, "train", "--method", "spartan", "--inner", "sam", "--swa", "--print-config")
    assert {"spartan", "sam", "swa"} <= set(yaml.safe_load(out)) and "fullbatch" not in yaml.safe_load(out)
    assert load_config(overrides={"method": "sam"}).sam.rho == 0.05  # printed values are resolved, not defaults only


def test_max_steps_stops_early_says_so_and_scores_the_weights(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", *TINY, "--max-steps", "3", "--out", str(tmp_path), "--name", "quick")
    summary = json.loads((tmp_path / "quick" / "summary.json").read_text())
    assert code == 0 and summary["steps"] == 3 and summary["planned_steps"] == 8 and summary["test_acc"] is not None
    assert "stopped at --max-steps 3 of the 8 steps planned" in out
    assert not (tmp_path / "quick" / ".lock").exists()  # a finished run keeps no lock file
    code, out, _ = run_cli(capsys, "runs", str(tmp_path), "--json")
    assert json.loads(out)[0]["status"] == "cut short"  # not "finished 1/1"
    code, out, _ = run_cli(capsys, "runs", str(tmp_path))
    assert "1 run in" in out and "cut short by --max-steps" in out


def test_test_subset_scores_a_seeded_share_of_the_test_set(capsys, tmp_path):
    code, _, _ = run_cli(capsys, "train", *TINY, "--test-subset", "100", "--out", str(tmp_path), "--name", "t")
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert code == 0 and summary["test_examples"] == 100
    code, _, err = run_cli(capsys, "train", *TINY, "--test-subset", "99999", "--out", str(tmp_path))
    assert code == 2 and "--test-subset 99999 is more than the 512 test examples" in err


def test_runs_lists_finished_interrupted_and_failed_runs(capsys, tmp_path, monkeypatch):
    train(load_config(overrides={"dataset": "synthetic", "epochs": 1, "out": str(tmp_path), "name": "done"}))
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides={"dataset": "synthetic", "epochs": 1, "out": str(tmp_path), "name": "cut"}),
              hooks=StopAt(step=3))
    with pytest.raises(NonFiniteError):
        train(load_config(overrides={"dataset": "synthetic", "epochs": 1, "out": str(tmp_path), "name": "nan",
                                     "lr": 1e30}))
    code, out, _ = run_cli(capsys, "runs", str(tmp_path), "--json")
    rows = {r["run"]: r for r in json.loads(out)}
    assert code == 0 and {k: r["status"] for k, r in rows.items()} == {"done": "finished", "cut": "interrupted",
                                                                       "nan": "failed"}
    assert rows["done"]["final_test_acc"] is not None and rows["done"]["epochs_done"] == 1
    assert "non-finite" in rows["nan"]["error"]
    code, out, _ = run_cli(capsys, "runs", str(tmp_path))
    assert code == 0 and "interrupted" in out and "failed" in out


def test_resume_auto_picks_the_latest_interrupted_run(capsys, tmp_path):
    for name in ("a", "b"):
        with pytest.raises(KeyboardInterrupt):
            train(load_config(overrides={"dataset": "synthetic", "epochs": 1, "out": str(tmp_path), "name": name}),
                  hooks=StopAt(step=2))
    code, out, _ = run_cli(capsys, "train", "--resume", "auto", "--out", str(tmp_path), "--name", "a")
    assert code == 0 and f"resuming {tmp_path / 'a'}" in out
    assert (tmp_path / "a" / "summary.json").exists() and not (tmp_path / "b" / "summary.json").exists()
    code, out, _ = run_cli(capsys, "train", "--resume", "auto", "--out", str(tmp_path))
    assert code == 0 and (tmp_path / "b" / "summary.json").exists()
    code, _, err = run_cli(capsys, "train", "--resume", "auto", "--out", str(tmp_path))
    assert code == 2 and "no interrupted run" in err


def test_piped_output_has_full_width_lines_and_timestamped_progress(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "fastflat", "train", *TINY, "--out", str(tmp_path / ("a-long-folder-name" * 3)),
                           "--name", "run-with-a-name-long-enough-to-wrap-at-80-columns"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = done.stdout.splitlines()
    assert done.returncode == 0
    progress = [line for line in lines if " step " in line and "loss" in line]
    assert progress and all(line[:4].isdigit() and line[10] == " " for line in progress)  # a date first
    assert len(progress) < 8  # not a line for each of the 8 steps: at most one every 10 s
    assert all("samples/s" in line for line in progress)  # not split over two lines
    assert any(len(line) > 80 for line in lines)  # the run line and the summary keep their width
    assert any("run-with-a-name-long-enough-to-wrap-at-80-columns" in line for line in lines)


def test_step_logs_csv_and_tensorboard_and_a_resumed_run_logs_each_step_once(tmp_path):
    settings = {"dataset": "synthetic", "epochs": 4, "log_every": 3, "tensorboard": True}  # 32 steps: >= 10 lines
    whole = tmp_path / "whole" / "r"
    train(load_config(overrides={**settings, "out": str(tmp_path / "whole"), "name": "r"}))
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides={**settings, "out": str(tmp_path / "cut"), "name": "r"}), hooks=StopAt(step=10))
    from fastflat.loop import resume

    resume(tmp_path / "cut" / "r")
    steps = [json.loads(line) for line in (whole / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(3, 31, 3)) and steps[-1]["epoch"] == pytest.approx(30 / 8)
    assert (tmp_path / "cut" / "r" / "steps.jsonl").read_text() == (whole / "steps.jsonl").read_text()
    import csv

    rows = list(csv.DictReader((whole / "steps.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(3, 31, 3)) and float(rows[0]["lr"]) == steps[0]["lr"]
    epochs = list(csv.DictReader((whole / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in epochs] == [1, 2, 3, 4] and "test_acc" in epochs[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(whole / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("step/train_loss")] == list(range(3, 31, 3))
    assert [e.step for e in board.Scalars("epoch/test_acc")] == [8, 16, 24, 32]
    cut = EventAccumulator(str(tmp_path / "cut" / "r" / "tensorboard"))
    cut.Reload()
    assert [e.step for e in cut.Scalars("step/train_loss")] == list(range(3, 31, 3))  # resume purged the repeat


def test_a_finished_constant_lr_run_extends_to_what_a_longer_run_gives(capsys, tmp_path):
    import torch

    base = ["train", "--dataset", "synthetic", "--schedule", "constant", "--out", str(tmp_path)]
    assert main([*base, "--epochs", "2", "--name", "long"]) == 0
    assert main([*base, "--epochs", "1", "--name", "short"]) == 0
    code, _, _ = run_cli(capsys, "train", "--resume", str(tmp_path / "short"), "--epochs", "2")
    summary = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert code == 0 and summary["epochs"] == 2 and summary["steps"] == 16
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["model"] for r in ("long", "short"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((tmp_path / "short" / "config.yaml").read_text())["epochs"] == 2


def test_a_run_whose_schedule_spans_its_budget_refuses_to_extend(capsys, tmp_path):
    assert main(["train", *TINY, "--out", str(tmp_path), "--name", "cos"]) == 0
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "cos"), "--epochs", "3")
    assert code == 2 and "cannot be extended" in err and "cosine schedule" in err
    assert (tmp_path / "cos" / "summary.json").exists()  # nothing touched


def test_a_short_run_still_logs_its_steps(tmp_path):
    """--log-every 50 over a 16-step run: every step logged (at least 10 lines a run), so curves.png's LR
    panel shows the schedule and not a straight line between epochs."""
    train(load_config(overrides={"dataset": "synthetic", "epochs": 2, "schedule": "cosine", "out": str(tmp_path),
                                 "name": "r"}))
    steps = [json.loads(line) for line in (tmp_path / "r" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 16 and len({r["lr"] for r in steps}) > 10


def test_run_names_say_each_part_once():
    from fastflat.runs.listing import default_run_name

    custom = load_config(overrides={"method": "sam", "model": "custom:Sequential", "dataset": "custom"})
    assert default_run_name(custom).startswith("sam-custom-Sequential-s0-")  # not sam-custom-custom-Sequential
    assert default_run_name(load_config(overrides={"model": "torchvision:resnet18"})).startswith(
        "sgd-fashion-mnist-torchvision-resnet18-s0-")
