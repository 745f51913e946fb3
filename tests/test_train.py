"""The shared loop and the SGD/SAM methods, end to end on tiny synthetic data (seconds on a CPU)."""

import json

import pytest
import torch
from torch import nn

import fastflat
from fastflat.config import load_config
from fastflat.runs.rundir import RunDir
from fastflat.loss.closures import BatchClosure, frozen_bn_stats
from fastflat.loop import build_trainer, resume, train

from helpers import StopAt


def tiny(tmp_path, **overrides):
    base = {"dataset": "synthetic", "epochs": 1, "batch_size": 128, "out": str(tmp_path), "name": "run"}
    return load_config(overrides={**base, **overrides})


def _weights(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return torch.cat([v.reshape(-1).float() for v in state["model"].values()])



def test_val_split_is_held_out_of_training_and_scored_every_epoch(tmp_path):
    summary = train(tiny(tmp_path, epochs=2, val_split=0.25))
    assert summary["val_split_size"] == 256 and summary["train_size"] == 1024 - 256
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [0 <= r["val_acc"] <= 100 and r["val_loss"] > 0 for r in records] == [True, True]
    assert summary["val_acc"] == records[-1]["val_acc"]
    # the split rebuilt from the saved config (as `fastflat ensemble` does) is the one training scored
    from fastflat import data as datasets
    from fastflat.data.models import build_model
    from fastflat.loss.evaluation import evaluate

    data = datasets.load_dataset("synthetic", seed=0)
    _, validation = datasets.hold_out_validation(data, 0.25, seed=0)
    model = build_model("fastcnn", data.in_channels, data.num_classes, data.image_size)
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"])
    again = evaluate(model, validation, data, 512)
    assert again["acc"] == pytest.approx(summary["val_acc"]) and again["loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-5)


def test_git_sha_falls_back_to_the_environment_outside_a_checkout(monkeypatch):
    from fastflat.runs import rundir

    monkeypatch.setattr(rundir, "_repo_sha", lambda: None)  # as for a copy of the package in /tmp
    monkeypatch.setenv("FASTFLAT_GIT_SHA", "abc123")
    assert rundir.git_sha() == "abc123"
    monkeypatch.delenv("FASTFLAT_GIT_SHA")
    assert rundir.git_sha() is None


@pytest.mark.parametrize("method", ["sgd", "sam"])  # pure ES: tests/test_spartan.py
def test_a_run_writes_config_metrics_checkpoint_summary_and_learns(tmp_path, method):
    summary = train(tiny(tmp_path, method=method, epochs=2))
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "curves.png"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert summary["test_acc"] > 50.0  # chance is 10%
    saved = json.loads((run / "summary.json").read_text())
    assert saved["provenance"]["torch"] == torch.__version__ and saved["config"]["method"] == method


def test_a_new_run_never_reuses_an_existing_directory(tmp_path):
    train(tiny(tmp_path))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    summary = train(tiny(tmp_path))
    assert summary["run_dir"].endswith("run-2")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, method):
    straight = tmp_path / "straight"
    train(tiny(straight, method=method, epochs=2))
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(broken, method=method, epochs=2), hooks=StopAt(step=11))  # mid epoch 2
    assert torch.load(broken / "run" / "checkpoint.pt", weights_only=False)["position"]["step"] == 11
    resume(broken / "run")
    assert torch.equal(_weights(straight / "run"), _weights(broken / "run"))
    steps = [json.loads(x)["step"] for x in (broken / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [8, 16]


def test_sam_method_matches_the_sam_dropin(tmp_path):
    cfg = tiny(tmp_path, method="sam", momentum=0.9, weight_decay=5e-4, lr=0.1)
    trainer = build_trainer(cfg, RunDir.create(tmp_path, "t"))
    reference = build_trainer(cfg, RunDir.create(tmp_path, "r"))
    opt = fastflat.SAM(reference.model.parameters(), torch.optim.SGD, rho=cfg.sam.rho, lr=0.1,
                       momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = trainer.data.train.images[:64], trainer.data.train.labels[:64]
    x = (x.float() / 255 - 0.5) / 0.25
    for _ in range(3):
        trainer.method.step(trainer.flat, BatchClosure(trainer.model, trainer.flat, x, y, "none"), lr=0.1)
        nn.functional.cross_entropy(reference.model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(reference.model(x), y).backward()
        opt.second_step(zero_grad=True)
    torch.testing.assert_close(trainer.flat.params[0], reference.flat.params[0], rtol=1e-5, atol=1e-6)


def test_sam_takes_batchnorm_statistics_from_the_first_pass_only(tmp_path):
    trainer = build_trainer(tiny(tmp_path, method="sam"), RunDir.create(tmp_path, "t"))
    x = torch.randn(32, 1, 16, 16)
    y = torch.randint(0, 10, (32,))
    bn = next(m for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model(x)  # what one forward pass does to the statistics
    expected_mean, expected_count = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    trainer.model.load_state_dict(start)
    trainer.method.step(trainer.flat, BatchClosure(trainer.model, trainer.flat, x, y, "none"), lr=0.1)
    assert torch.equal(bn.running_mean, expected_mean) and torch.equal(bn.num_batches_tracked, expected_count)


def test_frozen_bn_stats_changes_nothing_and_restores_tracking():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_bn_stats(model):
        model(torch.randn(4, 1, 5, 5))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model[1].track_running_stats


def test_m_sharpness_averages_per_chunk_sam_gradients(tmp_path):
    cfg = tiny(tmp_path, method="sam", momentum=0.0, weight_decay=0.0, **{"sam.m": 16})
    trainer = build_trainer(cfg, RunDir.create(tmp_path, "t"))
    model, flat = trainer.model, trainer.flat
    model.eval()  # no BatchNorm batch statistics: chunks and whole batch see the same function
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    w0 = flat.params[0].clone()
    expected = torch.zeros_like(w0)
    for part in (slice(0, 16), slice(16, 32)):
        flat.zero_grad_()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        g = flat.grads[0].clone()
        with torch.no_grad():
            flat.params[0].add_(cfg.sam.rho * g / g.norm())
        flat.zero_grad_()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        expected += flat.grads[0] / 2
        with torch.no_grad():
            flat.params[0].copy_(w0)
    trainer.method.step(flat, BatchClosure(model, flat, x, y, "none"), lr=0.5)
    torch.testing.assert_close(flat.params[0], w0 - 0.5 * expected, rtol=1e-5, atol=1e-6)


def test_sam_training_is_the_same_on_the_triton_and_torch_paths(tmp_path, monkeypatch):
    losses = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTFLAT_BACKEND", backend)
        cfg = tiny(tmp_path / backend, method="sam", clip_grad=0.5, **{"sam.adaptive": True})
        trainer = build_trainer(cfg, RunDir.create(tmp_path / backend, "t"))
        x, y = trainer.data.train.images[:64].float() / 255, trainer.data.train.labels[:64]
        losses[backend] = torch.stack([
            trainer.method.step(trainer.flat, BatchClosure(trainer.model, trainer.flat, x, y, "none"), 0.1)["loss"]
            for _ in range(5)])
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-6)
    assert losses["torch"][-1] < losses["torch"][0]


def test_bf16_autocast_and_clipping_train(tmp_path):
    summary = train(tiny(tmp_path, method="sam", amp="bf16", clip_grad=1.0, epochs=2))
    assert summary["test_acc"] > 30.0
