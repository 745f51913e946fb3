"""Bad input through the CLI: one line on stderr naming the problem, exit code 2 (3 for a run that
went non-finite, 130 for Ctrl-C), no traceback, and nothing already saved lost or left behind."""

import errno
import gzip
import io
import json
import os

import pytest
import torch

from fastflat import data as datasets
from fastflat.cli import main
from fastflat.config import option_keys

TINY = ["--dataset", "synthetic", "--epochs", "1"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err, fragment):
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err


@pytest.fixture
def trained(capsys, tmp_path):
    """A finished 1-epoch synthetic run (cnn) at tmp_path/r."""
    assert run_cli(capsys, "train", *TINY, "--out", tmp_path, "--name", "r")[0] == 0
    return tmp_path / "r"


def rewrite_checkpoint(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())


# -- config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--lr", "inf"], "lr = inf is invalid: must be a finite number"),
    (["--rho", "inf"], "sam.rho = inf is invalid"),
    (["--sigma", "nan"], "spartan.sigma = nan is invalid"),
    (["--warmup-epochs", "inf"], "warmup_epochs = inf"),
    (["--label-smoothing", "nan"], "label_smoothing = nan"),
    (["--fge-cycle-epochs", "inf"], "fge.cycle_epochs = inf"),
    (["--seed", str(2**64)], "seed = 18446744073709551616 is invalid: must be in [0, 4294967295]"),
    (["--seed", "-1"], "seed = -1 is invalid"),
    (["--lr", "inf", "--rho", "-1", "--epochs", "0"], "3 config errors: "),
])
def test_bad_values_are_one_line_each_named_with_its_key(capsys, tmp_path, args, fragment):
    code, _, err = run_cli(capsys, "train", *args, "--out", tmp_path)
    assert code == 2
    one_line(err, fragment)
    assert not any(tmp_path.iterdir())  # nothing written


def test_every_config_error_is_reported_at_once_with_its_key_path(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: inf\nsam: {rho: -1, nrom: l2}\nspartan: {children: 3}\nepochs: many\n")
    code, _, err = run_cli(capsys, "train", "--config", cfg, "--out", tmp_path)
    assert code == 2
    for key in ("'sam.nrom'", "epochs = 'many'", "lr = inf", "sam.rho = -1", "spartan.children = 3"):
        one_line(err, key)


@pytest.mark.parametrize("text, fragment", [
    ("lr: 0.1\nepochs: 3\nlr: 0.2\n", "key 'lr' appears twice (lines 1 and 3)"),
    ("amp: no\n", "amp = False is invalid: use one of none, bf16, fp16 (YAML reads an unquoted no"),
    ("sam: 0.1\n", "sam must be a mapping"),
    ("sse: {keep: yes}\n", "sse.keep = True is invalid: a count in [0, sse.cycles = 2] (0 = all), or auto"),
])
def test_yaml_surprises_are_named(capsys, tmp_path, text, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, _, err = run_cli(capsys, "train", "--config", cfg, "--out", tmp_path)
    assert code == 2
    one_line(err, fragment)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(bytes(range(256)) * 4), "is not a text file"),
])
def test_a_config_that_is_not_a_yaml_file_is_one_line(capsys, tmp_path, make, fragment):
    make(tmp_path / "c.yaml")
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "c.yaml", "--out", tmp_path)
    assert code == 2
    one_line(err, fragment)


def test_help_lists_every_choice(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside a choice list
    _, out, _ = run_cli(capsys, "train", "--help")
    for choices in ("sgd|sam|es|fullbatch|swa|sse|fge|spartan", "constant|step|cosine", "raise|skip|rollback", "l2|linf",
                    "normalize|ranks", "fashion-mnist|mnist|cifar10|cifar100|synthetic"):
        assert choices in out.replace(" ", ""), choices


def test_every_config_key_has_a_train_option_and_every_option_a_key():
    import inspect

    from fastflat.cli.train import train

    params = set(inspect.signature(train).parameters) - {"config", "resume", "print_config", "nproc"}  # command flags
    assert params == set(option_keys())


# -- checkpoints and weights -----------------------------------------------------------------------------
def test_a_checkpoint_with_the_right_tag_but_missing_keys_is_one_line(capsys, trained):
    ckpt = trained / "checkpoint.pt"
    rewrite_checkpoint(ckpt, lambda s: s.pop("position"))
    before = ckpt.read_bytes()
    for command in (["eval", trained], ["train", "--resume", trained]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2
        one_line(err, "lacks position")
    assert ckpt.read_bytes() == before


def test_a_method_state_that_does_not_fit_is_one_line(capsys, trained):
    rewrite_checkpoint(trained / "checkpoint.pt", lambda s: s.update(method={"nothing": 1}))
    code, _, err = run_cli(capsys, "train", "--resume", trained)
    assert code == 2
    one_line(err, "does not fit --method sgd")


def foreign_weights(capsys, tmp_path):
    """A resnet18 run's weights: the wrong architecture for a cnn run."""
    assert run_cli(capsys, "train", *TINY, "--model", "resnet18", "--batch-size", "512", "--out", tmp_path,
                   "--name", "resnet")[0] == 0
    return torch.load(tmp_path / "resnet" / "checkpoint.pt", weights_only=True)["model"]


def test_weights_of_another_architecture_are_one_line_everywhere(capsys, tmp_path, trained):
    wrong = foreign_weights(capsys, tmp_path)
    rewrite_checkpoint(trained / "checkpoint.pt", lambda s: s.update(model=wrong))
    cases = [(["train", "--resume", trained], "does not fit model fastcnn"),
             (["train", *TINY, "--init", trained, "--out", tmp_path, "--name", "i"], "does not fit model fastcnn"),
             (["eval", trained], "does not fit model fastcnn"),
             (["ensemble", "--from", trained], "does not fit"),
             (["ensemble", "--from", tmp_path / "resnet", "--from", trained], "must share one model")]
    for args, fragment in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2, args
        one_line(err, fragment)
    assert not (tmp_path / "i").exists()


def test_a_foreign_snapshot_file_is_one_line(capsys, tmp_path):
    assert run_cli(capsys, "train", "--dataset", "synthetic", "--epochs", "2", "--method", "sse", "--out", tmp_path,
                   "--name", "s")[0] == 0
    member = tmp_path / "s" / "members" / "snapshot-01.pt"
    torch.save({"conv.weight": torch.zeros(3)}, member)
    code, _, err = run_cli(capsys, "ensemble", "--sse", tmp_path / "s")
    assert code == 2
    one_line(err, "snapshot-01.pt does not fit")


# -- data files ------------------------------------------------------------------------------------------
def idx_dir(tmp_path, images: bytes):
    """Fashion-MNIST's four file names; the train images replaced by `images` (gzip member)."""
    folder = tmp_path / "fm"
    folder.mkdir()
    labels = gzip.compress(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes(4))
    good = gzip.compress(b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (4, 8, 8)) + bytes(256))
    for stem, content in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                          ("t10k-images-idx3-ubyte", good), ("t10k-labels-idx1-ubyte", labels)):
        (folder / f"{stem}.gz").write_bytes(content)
    return folder


@pytest.mark.parametrize("images, fragment", [
    (b"plain bytes, not gzip", "is not a readable gzip file"),
    (gzip.compress(b"\x00\x00\x08\x03\x00\x00"), "truncated inside its IDX header"),
    (gzip.compress(bytes(40))[:-12], "is not a readable gzip file"),
])
def test_broken_dataset_files_are_one_line(capsys, tmp_path, images, fragment):
    folder = idx_dir(tmp_path, images)
    code, _, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-dir", folder, "--out", tmp_path / "runs")
    assert code == 2
    one_line(err, fragment)


# -- full disk, read-only directory --------------------------------------------------------------------
def test_a_full_disk_under_resume_is_one_line_and_the_checkpoint_survives(capsys, tmp_path, monkeypatch):
    assert run_cli(capsys, "train", "--dataset", "synthetic", "--epochs", "2", "--out", tmp_path, "--name", "r")[0] == 0
    run = tmp_path / "r"
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    before = (run / "checkpoint.pt").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    for args in (["train", "--resume", run], ["ensemble", "--from", run, "--out", tmp_path / "e"]):
        if args[0] == "train":  # a finished run has nothing to train: make it one epoch short
            rewrite = torch.load(run / "checkpoint.pt", weights_only=True)
            rewrite["position"].update(epoch=1, batch=0, step=8)
            buffer = io.BytesIO()
            torch.save(rewrite, buffer)
            (run / "checkpoint.pt").write_bytes(buffer.getvalue())
            before = (run / "checkpoint.pt").read_bytes()
        code, _, err = run_cli(capsys, *args)
        assert code == 2, args
        one_line(err, "No space left on device")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob(".*.tmp"))


def test_a_read_only_run_directory_under_resume_and_ensemble_is_one_line(capsys, trained, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    before = (trained / "checkpoint.pt").read_bytes()
    for args in (["train", "--resume", trained], ["ensemble", "--from", trained, "--out", trained.parent / "e"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2, args
        one_line(err, "Read-only file system")
    assert (trained / "checkpoint.pt").read_bytes() == before


# -- runs that end early ---------------------------------------------------------------------------------
def test_a_nan_run_exits_3_keeping_its_last_finite_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY, "--lr", "1e6", "--momentum", "0", "--out", tmp_path, "--name", "nan")
    assert code == 3
    one_line(err, "non-finite")
    assert "the last finite checkpoint (step 0) is kept" in err
    for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines() if (tmp_path / "nan" / "metrics.jsonl").exists() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(c))


def test_ctrl_c_before_training_starts_claims_no_checkpoint_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "load_dataset", interrupted)
    code, _, err = run_cli(capsys, "train", *TINY, "--out", tmp_path, "--name", "early")
    assert code == 130 and "no checkpoint was written" in err and "saved" not in err
    assert not (tmp_path / "early").exists()
