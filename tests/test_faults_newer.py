"""Faults in the paths added after the trainer: curve resume and its bad options, non-finite weights read
back, unreadable runs in listings, leftovers and races in run directories, and the Python API's inputs.
Each case is one an adversarial user met (issue 26); each test fails without its fix."""

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fastflat
from fastflat.cli import main
from helpers import TINY_RUN, one_line, train_runs
from fastflat.errors import Interrupted, NonFiniteError, UserError
from fastflat.runs.rundir import RunDir

TINY = TINY_RUN


@pytest.fixture(scope="module")
def ends(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ends")
    train_runs(folder, "a", "b")
    return folder


def _with_nan(src: Path, dst: Path) -> Path:
    """A copy of run `src` whose first weight holds a NaN."""
    dst.mkdir()
    state = torch.load(src / "checkpoint.pt", weights_only=True)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first].view(-1)[0] = float("nan")
    torch.save(state, dst / "checkpoint.pt")
    (dst / "config.yaml").write_text((src / "config.yaml").read_text())
    return dst


# -- 1, 2: fastflat curve ------------------------------------------------------------------------------------
def test_curve_resume_scores_with_the_runs_own_points_and_examples(ends, tmp_path, capsys):
    args = ["curve", "--start", str(ends / "a"), "--end", str(ends / "b"), "--epochs", "1", "--batch-size", "32",
            "--points", "3", "--examples", "64", "--out", str(tmp_path), "--name", "c"]
    assert main(args) == 0
    run = tmp_path / "c"
    (run / "curve.json").unlink()
    assert main(["curve", "--resume", str(run)]) == 0
    report = json.loads((run / "curve.json").read_text())
    assert len(report["t"]) == 3 and report["examples"] == 64  # not the defaults: 61 points, every example
    capsys.readouterr()
    assert main(["curve", "--resume", str(run), "--points", "5"]) == 2
    one_line(capsys.readouterr().err, "--resume continues the curve run with the settings it was started with")


def test_curve_with_a_diverging_lr_exits_3_with_one_line(ends, tmp_path, capsys):
    code = main(["curve", "--start", str(ends / "a"), "--end", str(ends / "b"), "--epochs", "1", "--batch-size", "32",
                 "--lr", "1e6", "--points", "3", "--out", str(tmp_path), "--name", "c"])
    err = capsys.readouterr().err
    assert code == 3 and "non-finite" in err and "Traceback" not in err


def test_curve_over_a_nan_end_point_exits_3_before_training(ends, tmp_path, capsys):
    bad = _with_nan(ends / "a", tmp_path / "nan")
    code = main(["curve", "--start", str(bad), "--end", str(ends / "b"), "--out", str(tmp_path / "runs")])
    assert code == 3
    one_line(capsys.readouterr().err, f"checkpoint {bad}", "non-finite")
    assert not (tmp_path / "runs").exists()


def test_curve_resume_of_a_run_that_is_no_curve_is_refused_before_training_it(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "2", "--max-steps", "2", "--out", str(tmp_path), "--name", "sgd"]) == 0
    (tmp_path / "sgd" / "summary.json").unlink()  # as a copied, unfinished run
    before = (tmp_path / "sgd" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["curve", "--resume", str(tmp_path / "sgd")]) == 2
    one_line(capsys.readouterr().err, "is a --method sgd run, not a curve")
    assert (tmp_path / "sgd" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("option, phrase", [(["--points", "1"], "--points must be at least 2"),
                                             (["--examples", "99999"], "--examples 99999 is larger than")])
def test_curve_options_that_cannot_work_are_refused_before_any_training(ends, tmp_path, capsys, option, phrase):
    code = main(["curve", "--start", str(ends / "a"), "--end", str(ends / "b"), *option, "--out", str(tmp_path / "r")])
    assert code == 2
    one_line(capsys.readouterr().err, phrase)
    assert not (tmp_path / "r").exists()


def test_sharpness_refuses_runs_of_two_models_and_impossible_options_before_measuring(ends, tmp_path, capsys):
    assert main(["train", "--dataset", "synthetic", "--subset", "64", "--batch-size", "32", "--epochs", "1",
                 "--model", "preact-resnet18", "--out", str(tmp_path), "--name", "big"]) == 0
    capsys.readouterr()
    assert main(["sharpness", str(ends / "a"), str(tmp_path / "big"), "--out", str(tmp_path / "s")]) == 2
    one_line(capsys.readouterr().err, "must share one model and dataset")
    assert main(["sharpness", str(ends / "a"), "--trace-probes", "1", "--top", "60", "--m", "abc",
                 "--out", str(tmp_path / "s")]) == 2
    one_line(capsys.readouterr().err, "--trace-probes 1", "--top 60: 1 to 50", "--m 'abc'")
    assert not (tmp_path / "s").exists()


# -- 3: non-finite weights ------------------------------------------------------------------------------------
def test_eval_ensemble_and_sharpness_of_a_nan_checkpoint_exit_3_naming_it(ends, tmp_path, capsys):
    bad = _with_nan(ends / "a", tmp_path / "nan")
    for args in (["eval", str(bad), "--json"], ["ensemble", "--from", str(bad), "--from", str(ends / "b")],
                 ["sharpness", str(bad), "--out", str(tmp_path / "s")]):
        assert main(args) == 3, args
        captured = capsys.readouterr()
        one_line(captured.err, "non-finite (NaN or inf)")
        assert "NaN" not in captured.out


def test_rollback_never_keeps_a_checkpoint_with_infinite_batchnorm_statistics(tmp_path):
    from fastflat.config import load_config
    from fastflat.loop import Hooks, build_trainer
    from fastflat.runs.rundir import load_checkpoint

    class PoisonBatchNorm(Hooks):  # what a huge activation does: a finite loss, an inf running variance
        def on_step(self, step, metrics):
            if step == 5:
                bn = next(m for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d))
                bn.running_var.fill_(float("inf"))

    cfg = load_config(overrides={"dataset": "synthetic", "subset": 256, "batch_size": 32, "epochs": 2,
                                 "on_nonfinite": "raise", "out": str(tmp_path), "name": "r"})
    trainer = build_trainer(cfg, RunDir.create(tmp_path, "r"), PoisonBatchNorm())
    with pytest.raises(NonFiniteError, match="running_var"):
        trainer.run_epochs()
    state = load_checkpoint(tmp_path / "r")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert state["position"]["step"] == 0  # the last finite checkpoint: the start, not epoch 1's


# -- 4: listings --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, metrics, reason", [
    ("5\n", None, "holds a int"), ("- a\n- b\n", None, "holds a list"), (b"\xff\xfe\x00", None, "not text"),
    ("method: sgd\n", "5\n", "line 1 is not an epoch record"), ("method: sgd\n", '{"loss": 1}\n', "line 1")])
def test_runs_lists_an_unreadable_run_with_its_reason_and_the_others_as_usual(ends, tmp_path, capsys, config, metrics, reason):
    import shutil

    shutil.copytree(ends / "a", tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_bytes(config if isinstance(config, bytes) else config.encode())
    if metrics is not None:
        (bad / "metrics.jsonl").write_text(metrics)
    assert main(["runs", str(tmp_path), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["status"] == "finished"
    assert rows["bad"]["status"] == "unreadable" and reason in rows["bad"]["error"]
    assert main(["train", "--resume", "auto", "--out", str(tmp_path)]) == 2  # no interrupted run: said, no crash
    one_line(capsys.readouterr().err, "no interrupted run")


# -- 5, 6: leftovers and races -------------------------------------------------------------------------------
def test_resume_removes_temporary_trajectory_files_a_kill_left(tmp_path):
    assert main(["train", *TINY, "--schedule", "constant", "--trajectory-every", "1", "--out", str(tmp_path),
                 "--name", "r"]) == 0
    run = tmp_path / "r"
    orphans = [run / "trajectory" / f".step-00000000{i}.pt.abc{i}.tmp" for i in range(3)]
    for orphan in orphans:
        orphan.write_bytes(b"cut short")
    fastflat.resume(run, epochs=2)  # a constant schedule extends
    assert not any(o.exists() for o in orphans)


def test_a_full_disk_while_caching_points_is_one_line(ends, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code = main(["landscape", "line", "--from", str(ends / "a"), "--to", str(ends / "b"), "--points", "2",
                 "--examples", "32", "--out", str(tmp_path)])
    assert code == 2
    one_line(capsys.readouterr().err, "cannot write the point cache", "No space left on device")


def test_runs_started_at_the_same_moment_with_one_name_take_name_and_name_2(tmp_path):
    for trial in range(10):
        start, made, errors = threading.Barrier(2), [], []

        def create():
            start.wait()
            try:
                made.append(RunDir.create(tmp_path / str(trial), "same").path.name)
            except UserError as e:
                errors.append(e)

        threads = [threading.Thread(target=create) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and sorted(made) == ["same", "same-2"]


# -- 7: sizes beyond the data ---------------------------------------------------------------------------------
def test_a_subset_larger_than_the_training_set_is_refused(tmp_path, capsys):
    assert main(["train", "--dataset", "synthetic", "--subset", "999999", "--out", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err, "--subset 999999 is more than the 1024 training examples")
    assert not any(tmp_path.iterdir())


# -- 8: the Python API ----------------------------------------------------------------------------------------
def _mlp(classes=3):
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, classes))


def _pairs(top_label=2):
    train = (torch.randn(64, 20), torch.randint(0, top_label + 1, (64,)))
    return train, (torch.randn(32, 20), torch.randint(0, top_label + 1, (32,)))


@pytest.mark.parametrize("call, phrase", [
    (lambda out: fastflat.train({"out": out}, model=_mlp(3), data=_pairs(top_label=5)), "labels go up to 5 but model= returns 3"),
    (lambda out: fastflat.train([("method", "sam")]), "config= takes a dict of settings"),
    (lambda out: fastflat.train({"out": out}, model="cnn", data=_pairs()), "model= takes a torch.nn.Module"),
    (lambda out: fastflat.train({"out": out}, data=_pairs()), "pass your own nn.Module as model="),
    (lambda out: fastflat.train({"out": out}, model=nn.Linear(7, 3), data=_pairs()), "model= cannot take the inputs"),
])
def test_python_api_mistakes_are_user_errors_before_any_run_directory(tmp_path, call, phrase):
    with pytest.raises(UserError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        call(str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_python_api_with_datasets_still_trains(tmp_path):
    train, test = _pairs()
    summary = fastflat.train({"out": str(tmp_path), "epochs": 1, "batch_size": 16}, model=_mlp(),
                             data=(TensorDataset(*train), test))
    assert summary["steps"] == 4


# -- 9: Ctrl-C in curve and landscape --------------------------------------------------------------------------
def test_ctrl_c_in_landscape_says_where_the_points_are_cached(ends, tmp_path, capsys, monkeypatch):
    from fastflat.geometry import landscape

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(landscape, "line", interrupted)
    code = main(["landscape", "line", "--from", str(ends / "a"), "--to", str(ends / "b"), "--out", str(tmp_path)])
    assert code == 130
    one_line(capsys.readouterr().err, f"interrupted: the points scored so far are cached in {tmp_path}")


def test_ctrl_c_while_a_curve_trains_says_how_to_continue(ends, tmp_path, capsys, monkeypatch):
    from fastflat import loop

    def interrupted(cfg, hooks):  # the loop's part: a run directory, its start announced, then Ctrl-C
        (tmp_path / "c").mkdir()
        hooks.on_start({"run_dir": str(tmp_path / "c"), "steps_per_epoch": 4, "total_steps": 4, "noisy_labels": 0,
                        "params": 1, "device": "cpu", "train_size": 128, "unit": "epoch", "step": 0})
        raise Interrupted(3)

    monkeypatch.setattr(loop, "train", interrupted)
    code = main(["curve", "--start", str(ends / "a"), "--end", str(ends / "b"), "--out", str(tmp_path), "--name", "c"])
    assert code == 130
    err = capsys.readouterr().err
    assert f"interrupted: checkpoint saved at step 3; continue with: fastflat curve --resume {tmp_path / 'c'}" in err


def test_result_files_are_readable_as_the_umask_says(tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["train", *TINY, "--out", str(tmp_path), "--name", "r"]) == 0
    finally:
        os.umask(previous)
    for name in ("checkpoint.pt", "summary.json", "config.yaml", "metrics.jsonl", "curves.png"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o644, name


def test_fastflat_train_shows_progress_unless_asked_not_to(tmp_path, capsys):
    fastflat.train({"dataset": "synthetic", "subset": 128, "batch_size": 32, "epochs": 1, "out": str(tmp_path),
                    "name": "shown"})
    out = capsys.readouterr().out
    assert f"run {tmp_path / 'shown'}" in out and "epoch   1" in out and "test accuracy" in out
    fastflat.train({"dataset": "synthetic", "subset": 128, "batch_size": 32, "epochs": 1, "out": str(tmp_path),
                    "name": "quiet"}, progress=False)
    assert capsys.readouterr().out == ""


def test_a_curve_trains_its_bend_on_the_end_runs_data_and_says_when_it_does_not(ends, tmp_path, capsys):
    """Last round the bend trained on all 60,000 images between ends trained on 2,000: a curve whose middle
    beat its ends only because it saw 30x the data. Now it takes the ends' subset and seed, and warns."""
    import yaml

    base = ["curve", "--from", str(ends / "a"), "--to", str(ends / "b"), "--max-steps", "2", "--points", "2",
            "--examples", "32", "--out", str(tmp_path)]
    capsys.readouterr()
    assert main([*base, "--name", "same"]) == 0
    config = yaml.safe_load((tmp_path / "same" / "config.yaml").read_text())
    assert config["subset"] == 128 and config["seed"] == 1 and config["max_steps"] == 2
    err = capsys.readouterr().err
    assert "the end runs saw different data (seed 1 / 2)" in err and "while the ends trained" not in err
    assert main([*base, "--name", "more", "--subset", "256"]) == 0
    assert "the bend trains on --subset 256 while the ends trained on 128" in capsys.readouterr().err
