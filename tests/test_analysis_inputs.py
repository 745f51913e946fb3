"""The analysis commands and user data as hard as the trainer (issue 25): every bad option one line and
exit 2 before any work or file, NaN weights exit 3, point caches keyed by content, and image trees with
files that do not decode. Each test fails without its fix."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastflat.cli import main
from helpers import TINY_RUN, one_line, train_runs

TINY = TINY_RUN


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    train_runs(folder, "a", "b", "c")
    return folder


# -- landscape ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, phrase", [
    (["plane", "--at", "{a}", "--at", "{b}", "--at", "{c}", "--margin", "inf"], "--margin inf"),
    (["plane", "--at", "{a}", "--at", "{b}", "--at", "{c}", "--grid", "100000"], "--grid 100000:"),
    (["plane", "--at", "{a}", "--at", "{b}", "--at", "{c}", "--examples", "-5"], "--examples -5"),
    (["line", "--from", "{a}", "--to", "{b}", "--range", "0", "inf"], "--range 0.0 inf"),
    (["line", "--from", "{a}", "--to", "{b}", "--examples", "5000"], "--examples 5000 is larger than the 1024"),
    (["rays", "--at", "{a}", "--distance", "inf"], "--distance inf"),
    (["rays", "--at", "{a}", "--distance", "nan"], "--distance nan"),
])
def test_landscape_bad_options_are_one_line_and_write_nothing(runs, tmp_path, capsys, args, phrase):
    code = main(["landscape", *[a.format(a=runs / "a", b=runs / "b", c=runs / "c") for a in args],
                 "--out", str(tmp_path / "out")])
    assert code == 2
    one_line(capsys.readouterr().err, phrase)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.json"))


def test_a_huge_grid_is_refused_with_a_grid_that_fits(runs, tmp_path, capsys):
    main(["landscape", "plane", "--at", str(runs / "a"), "--at", str(runs / "b"), "--at", str(runs / "c"),
          "--grid", "100000", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "GiB" in err and "--grid" in err and "or less" in err


def test_landscape_of_nan_weights_exits_3(runs, tmp_path, capsys):
    bad = tmp_path / "nan"
    shutil.copytree(runs / "a", bad)
    state = torch.load(bad / "checkpoint.pt", weights_only=True)
    next(v for v in state["model"].values() if v.is_floating_point()).view(-1)[0] = float("inf")
    torch.save(state, bad / "checkpoint.pt")
    assert main(["landscape", "line", "--from", str(bad), "--to", str(runs / "b"), "--out", str(tmp_path / "o")]) == 3
    one_line(capsys.readouterr().err, "non-finite")


def test_replaced_weights_at_the_same_path_are_scored_afresh(runs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(runs / "a", moved)
    args = ["landscape", "line", "--from", str(moved), "--to", str(runs / "b"), "--points", "3", "--examples", "64"]
    assert main([*args, "--out", str(tmp_path / "out"), "--name", "first"]) == 0
    first = json.loads((tmp_path / "out" / "first" / "line.json").read_text())["train_err"]
    shutil.copy(runs / "c" / "checkpoint.pt", moved / "checkpoint.pt")  # other weights, same path
    assert main([*args, "--out", str(tmp_path / "out"), "--name", "rerun"]) == 0
    rerun = json.loads((tmp_path / "out" / "rerun" / "line.json").read_text())["train_err"]
    assert main([*args, "--out", str(tmp_path / "fresh"), "--name", "fresh"]) == 0  # another cache
    fresh = json.loads((tmp_path / "fresh" / "fresh" / "line.json").read_text())["train_err"]
    assert rerun == fresh and rerun != first


def test_a_rerun_never_overwrites_a_report(runs, tmp_path, capsys):
    args = ["landscape", "line", "--from", str(runs / "a"), "--to", str(runs / "b"), "--points", "2", "--examples", "64",
            "--out", str(tmp_path), "--name", "same"]
    assert main(args) == 0
    (tmp_path / "same" / "line.json").write_text("kept")
    assert main(args) == 0
    assert (tmp_path / "same" / "line.json").read_text() == "kept"
    assert json.loads((tmp_path / "same-2" / "line.json").read_text())["kind"] == "line"
    assert "same-2" in capsys.readouterr().out


def test_a_rerun_with_the_same_weights_reuses_every_cached_point(runs, tmp_path, monkeypatch):
    from fastflat.geometry import points

    args = ["landscape", "line", "--from", str(runs / "a"), "--to", str(runs / "b"), "--points", "3", "--examples", "64",
            "--out", str(tmp_path)]
    assert main(args) == 0
    shutil.copytree(runs / "a", tmp_path / "a-copy")  # the same weights under another name: still valid
    monkeypatch.setattr(points.PointScorer, "score_one", lambda self, v: pytest.fail("scored a cached point"))
    assert main([*args[:3], str(tmp_path / "a-copy"), *args[4:]]) == 0


# -- sharpness ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, phrase", [(["--rho", "inf"], "--rho inf"), (["--rho", "nan"], "--rho nan"),
                                          (["--tol", "-1"], "--tol -1.0"), (["--tol", "nan"], "--tol nan"),
                                          (["--m", "abc"], "--m 'abc'"), (["--m", "256", "--examples", "128"], "--m '256'")])
def test_sharpness_bad_options_are_one_line(runs, tmp_path, capsys, args, phrase):
    assert main(["sharpness", str(runs / "a"), *args, "--out", str(tmp_path / "s")]) == 2
    one_line(capsys.readouterr().err, phrase)
    assert not (tmp_path / "s").exists()


# -- image folders -----------------------------------------------------------------------------------------------
def _tree(root, classes=2, broken=True):
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, size=(10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    if broken:
        (root / "train" / "class0" / "notes.png").write_text("not an image")
        (root / "train" / "class1" / "empty.png").write_bytes(b"")
        whole = (root / "train" / "class1" / "0.png").read_bytes()
        (root / "val" / "class0" / "cut.png").write_bytes(whole[: len(whole) // 2])
    return root


def test_a_tree_with_files_that_do_not_decode_is_refused_naming_them(tmp_path, capsys):
    root = _tree(tmp_path / "tree")
    code = main(["train", "--dataset", f"folder:{root}", "--image-size", "8", "--out", str(tmp_path / "runs")])
    assert code == 2
    one_line(capsys.readouterr().err, "3 image(s) do not decode", "notes.png", "empty.png", "cut.png",
             "--bad-images skip")
    assert not any((tmp_path / "runs").glob("*/config.yaml"))  # no run directory left behind


def test_bad_images_skip_trains_without_them_and_records_them(tmp_path, capsys):
    root = _tree(tmp_path / "tree")
    code = main(["train", "--dataset", f"folder:{root}", "--bad-images", "skip", "--image-size", "8", "--epochs", "1",
                 "--batch-size", "8", "--out", str(tmp_path / "runs"), "--name", "r"])
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_size"] == 24 and summary["skipped_images"] == 3
    recorded = (run / "skipped-images.txt").read_text()
    assert all(name in recorded for name in ("notes.png", "empty.png", "cut.png"))
    assert "3 image(s) do not decode and were left out" in capsys.readouterr().out


def test_a_single_class_tree_is_refused_with_the_reason(tmp_path, capsys):
    root = _tree(tmp_path / "tree", classes=1, broken=False)
    assert main(["train", "--dataset", f"folder:{root}", "--out", str(tmp_path / "runs")]) == 2
    one_line(capsys.readouterr().err, "one class folder (class0)", "at least two")


def test_a_hessian_request_that_cannot_fit_is_refused_with_steps_that_fit(runs, tmp_path, capsys, monkeypatch):
    import os

    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 16 * 2**20 // 4096 if name == "SC_PHYS_PAGES" else real(name))
    assert main(["sharpness", str(runs / "a"), "--lanczos-steps", "50", "--out", str(tmp_path / "s")]) == 2  # 16 MiB
    one_line(capsys.readouterr().err, "--lanczos-steps 50 over 26,202 values", "about 10 MiB", "of this machine's 16 MiB",
             "use --lanczos-steps 39 or fewer")
    assert not (tmp_path / "s").exists()
