"""--optimizer schedulefree-sgd|schedulefree-adamw through the schedulefree package: the same steps as its
own loop, evaluation and checkpoints at its average x (BatchNorm recomputed for it), training resumed at y
bit for bit, and refusals where it cannot compose."""

import copy
import json

import pytest
import torch
from torch import nn

from fastflat.config import load_config
from fastflat.errors import UserError
from fastflat.loop import resume, train
from fastflat.loop.assembly import build_trainer
from fastflat.loss.closures import BatchClosure
from fastflat.runs.rundir import RunDir

from helpers import StopAt

schedulefree = pytest.importorskip("schedulefree", reason="the schedulefree package is a test dependency (.[dev])")


def _config(tmp_path, **overrides):
    return load_config(overrides={"dataset": "synthetic", "subset": 128, "batch_size": 32, "epochs": 2, "lr": 0.1, "model": "cnn",
                                  "schedule": "constant", "optimizer": "schedulefree-sgd", "out": str(tmp_path),
                                  "name": "run", **overrides})


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


@pytest.mark.parametrize("name, cls, kwargs", [
    ("schedulefree-sgd", "SGDScheduleFree", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    ("schedulefree-adamw", "AdamWScheduleFree", {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 5e-4})])
def test_steps_and_the_evaluated_average_equal_the_packages_own_loop(tmp_path, name, cls, kwargs):
    cfg = _config(tmp_path, optimizer=name, lr=kwargs["lr"], weight_decay=5e-4)
    trainer = build_trainer(cfg, RunDir.create(tmp_path, "t"))
    reference = copy.deepcopy(trainer.model)  # plain parameters: the copy owns its storage
    opt = getattr(schedulefree, cls)(reference.parameters(), **kwargs)
    opt.train()
    x, y = trainer.data.train.images[:32], trainer.data.train.labels[:32]
    x = (x.float() / 255 - 0.5) / 0.25
    for _ in range(15):
        trainer.method.step(trainer.flat, BatchClosure(trainer.model, trainer.flat, x, y, "none"), lr=kwargs["lr"])
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(_flat(trainer.model.parameters()), _flat(reference.parameters()), rtol=1e-5, atol=1e-6)
    y_before = _flat(trainer.model.parameters()).clone()
    with trainer.method.evaluation_weights(trainer.flat):
        opt.eval()
        torch.testing.assert_close(_flat(trainer.model.parameters()), _flat(reference.parameters()), rtol=1e-5, atol=1e-6)
    assert torch.equal(_flat(trainer.model.parameters()), y_before)  # back at y bit for bit, not recomputed


def test_the_checkpoint_holds_the_average_that_was_scored(tmp_path, capsys):
    from fastflat.cli import main

    summary = train(_config(tmp_path))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["test_acc"] == pytest.approx(summary["test_acc"]) and summary["test_acc"] > 30


def test_a_run_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    train(_config(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "cut"), hooks=StopAt(step=5))
    resume(tmp_path / "cut" / "run")
    whole, cut = (torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False) for d in ("whole", "cut"))
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    assert all(torch.equal(a, b) for a, b in zip(whole["method"]["train_weights"], cut["method"]["train_weights"]))


def test_sam_over_a_schedule_free_optimizer_trains(tmp_path):
    summary = train(_config(tmp_path, method="sam"))
    assert summary["test_acc"] > 30


@pytest.mark.parametrize("overrides, says", [
    ({"schedule": "cosine"}, "use --schedule constant"),
    ({"method": "spartan"}, "cannot drive --method spartan: mutation rounds move the weights"),
    ({"method": "es"}, "cannot drive --method es"),
    ({"swa": {"enabled": True}}, "already delivers an average (its x): not with swa"),
    ({"ema": {"decay": 0.9}}, "already delivers an average (its x): not with ema"),
    ({"method": "sse"}, "--method sse cycles the learning rate"),
    ({"decay_norm_bias": False}, "--no-decay-norm-bias cannot mask it")])
def test_what_does_not_compose_is_refused_with_the_reason(tmp_path, overrides, says):
    with pytest.raises(UserError, match=__import__("re").escape(says)):
        _config(tmp_path, **overrides)


@pytest.mark.parametrize("overrides", [{"method": "fullbatch", "fullbatch": {"chunk_size": 64}, "epochs": 3},
                                       {"accumulate": 2, "batch_size": 16}, {"amp": "bf16"}])
def test_schedule_free_composes_with_full_batch_accumulation_and_bf16(tmp_path, overrides):
    summary = train(_config(tmp_path, **overrides))
    assert summary["test_acc"] is not None and summary["steps"] >= 2
