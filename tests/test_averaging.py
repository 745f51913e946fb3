"""--ema DECAY over any method: parity with torch's AveragedModel and timm's ModelEmaV3 step for step, the
average scored every epoch and delivered as the run's model, exact resume, and what composes."""

import copy
import json

import pytest
import torch

from fastflat.config import load_config
from fastflat.errors import UserError
from fastflat.loop import resume, train
from fastflat.loop.assembly import build_trainer
from fastflat.methods.averaging import EMA, decay_at
from fastflat.runs.rundir import RunDir

from helpers import StopAt


def _config(tmp_path, **overrides):
    return load_config(overrides={"dataset": "synthetic", "subset": 128, "batch_size": 32, "epochs": 2,
                                  "out": str(tmp_path), "name": "run", **overrides})


def _moved(trainer, generator):
    """New weights and BatchNorm statistics, as an optimizer step and its forward passes would leave them."""
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        for name, b in trainer.model.named_buffers():
            if b.is_floating_point():
                b.add_(torch.rand(b.shape, generator=generator) * 0.1)


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _by_parameter(trainer, vectors):
    """Flat vectors laid out like the trainer's buffer (channels_last for fastcnn), as parameters in NCHW order."""
    return _flat(trainer.flat.shaped(vectors))


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_the_average_equals_torchs_averaged_model_with_the_ema_avg_fn(tmp_path, decay):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    trainer = build_trainer(_config(tmp_path, ema={"decay": decay}), RunDir.create(tmp_path, "t"))
    ema = trainer.method
    assert isinstance(ema, EMA)
    reference = AveragedModel(copy.deepcopy(trainer.model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 13):
        _moved(trainer, generator)
        ema.after_step(trainer.flat, step)
        reference.update_parameters(trainer.model)
        torch.testing.assert_close(_by_parameter(trainer, ema.average), _flat(reference.module.parameters()), rtol=1e-6, atol=1e-7)
    statistics = {n: b for n, b in reference.module.named_buffers() if b.is_floating_point()}
    for name, b in ema.bn_average.items():
        torch.testing.assert_close(b, statistics[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("warmup", ["off", "timm"])
def test_the_average_equals_timms_model_ema_v3_step_for_step(tmp_path, warmup):
    from timm.utils.model_ema import ModelEmaV3

    decay = 0.99
    trainer = build_trainer(_config(tmp_path, ema={"decay": decay, "warmup": warmup}), RunDir.create(tmp_path, "t"))
    ema = trainer.method
    reference = ModelEmaV3(copy.deepcopy(trainer.model), decay=decay, use_warmup=warmup == "timm")
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 21):
        _moved(trainer, generator)
        ema.after_step(trainer.flat, step)
        reference.update(trainer.model, step=step)  # as timm's train.py: the updates so far, from 1
        assert decay_at(step, decay, warmup) == pytest.approx(reference.get_decay(step), abs=1e-15) or step == 1
        torch.testing.assert_close(_by_parameter(trainer, ema.average), _flat(reference.module.parameters()), rtol=1e-6, atol=1e-7)
    statistics = {n: b for n, b in reference.module.named_buffers() if b.is_floating_point()}
    for name, b in ema.bn_average.items():
        torch.testing.assert_close(b, statistics[name], rtol=1e-6, atol=1e-7)


def test_the_tf_warmup_ramps_as_tensorflows_num_updates_rule():
    assert [decay_at(k, 0.999, "tf") for k in (2, 3, 1001, 100_001)] == pytest.approx([2 / 11, 3 / 12, 1001 / 1010, 0.999])
    assert decay_at(50, 0.5, "tf") == 0.5  # never above the decay asked for


def test_an_ema_run_scores_its_average_every_epoch_and_delivers_it(tmp_path):
    summary = train(_config(tmp_path, ema={"decay": 0.9}))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("ema_test_acc" in r and "test_acc" in r for r in records)
    assert summary["delivered"] == "ema" and summary["test_acc"] == summary["ema_acc"]
    assert summary["iterate_acc"] == records[-1]["test_acc"] and summary["ema_updates"] == summary["steps"]
    assert summary["ema_acc"] == records[-1]["ema_test_acc"]  # the same model, scored the same way
    member = torch.load(run / "members" / "ema.pt", weights_only=True)
    weights = [v for k, v in member.items() if v.is_floating_point() and "running" not in k]
    assert not torch.equal(_flat(weights[:1]), _flat([torch.load(run / "checkpoint.pt", weights_only=False)["model"][
        next(iter(member))]]))  # the average, not the iterate


def test_an_ema_run_killed_mid_epoch_resumes_to_the_same_average(tmp_path):
    train(_config(tmp_path / "whole", ema={"decay": 0.9, "warmup": "timm"}))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "cut", ema={"decay": 0.9, "warmup": "timm"}), hooks=StopAt(step=5))
    resume(tmp_path / "cut" / "run")
    whole = torch.load(tmp_path / "whole" / "run" / "members" / "ema.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "run" / "members" / "ema.pt", weights_only=True)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


@pytest.mark.parametrize("method, extra", [("sam", {}), ("spartan", {"spartan": {"mutate_every": 2, "children": 2}}),
                                           ("fullbatch", {"epochs": 2, "fullbatch": {"chunk_size": 64}}), ("fge", {"epochs": 2})])
def test_ema_averages_over_other_methods(tmp_path, method, extra):
    summary = train(_config(tmp_path, method=method, ema={"decay": 0.5}, **extra))
    assert summary["delivered"] == "ema" and summary["ema_acc"] is not None and summary["ema_updates"] >= 2


@pytest.mark.parametrize("overrides, says", [
    ({"swa": {"enabled": True}}, "ema and swa each deliver an average as the run's model"),
    ({"method": "swa"}, "ema and swa each deliver an average as the run's model"),
    ({"lawa": {"k": 3}}, "ema and lawa each deliver an average"),
    ({"method": "curve"}, "--ema cannot average --method curve"),
    ({"method": "ema", "ema": {"decay": 0.0}}, "--method ema averages with --ema DECAY"),
    ({"ema": {"decay": 1.0}}, "must be in [0, 1)")])
def test_what_does_not_compose_is_refused_with_the_reason(tmp_path, overrides, says):
    settings = {"ema": {"decay": 0.9}, **overrides}
    with pytest.raises(UserError, match=__import__("re").escape(says)):
        _config(tmp_path, **settings)


# -- LAWA ---------------------------------------------------------------------------------------------------
def test_lawa_is_the_mean_of_the_last_k_checkpoints_through_the_ring(tmp_path):
    trainer = build_trainer(_config(tmp_path, lawa={"k": 3, "every": 2}), RunDir.create(tmp_path, "t"))
    lawa, generator, taken = trainer.method, torch.Generator().manual_seed(4), []
    for step in range(1, 16):
        _moved(trainer, generator)
        lawa.after_step(trainer.flat, step)
        if step % 2 == 0:
            taken.append(_flat(trainer.model.parameters()).clone())
        if taken:  # the running sum never drifts from the mean it stands for, after the ring wraps too
            torch.testing.assert_close(_by_parameter(trainer, lawa.average), torch.stack(taken[-3:]).mean(0), rtol=1e-6, atol=1e-7)
    assert lawa.stored == 7


def test_a_lawa_run_delivers_the_mean_of_its_last_checkpoints(tmp_path):
    summary = train(_config(tmp_path, lawa={"k": 3, "every": 2}, trajectory_every=2))
    run = tmp_path / "run"
    assert summary["delivered"] == "lawa" and summary["test_acc"] == summary["lawa_acc"]
    assert summary["lawa_checkpoints"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("lawa_test_acc" in r for r in records)
    points = sorted((run / "trajectory").glob("step-*.pt"))[-3:]
    mean = torch.stack([torch.load(p, weights_only=True)["weights"] for p in points]).mean(0)
    member = torch.load(run / "members" / "lawa.pt", weights_only=True)
    trainer = build_trainer(_config(tmp_path / "x"), RunDir.create(tmp_path / "x", "y"))
    names = [n for n, _ in trainer.model.named_parameters()]
    torch.testing.assert_close(_flat([member[n] for n in names]), mean, rtol=1e-6, atol=1e-7)


def test_a_lawa_run_killed_mid_epoch_resumes_to_the_same_average(tmp_path):
    train(_config(tmp_path / "whole", lawa={"k": 2, "every": 3}))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "cut", lawa={"k": 2, "every": 3}), hooks=StopAt(step=7))
    resume(tmp_path / "cut" / "run")
    whole = torch.load(tmp_path / "whole" / "run" / "members" / "lawa.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "run" / "members" / "lawa.pt", weights_only=True)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


@pytest.mark.parametrize("method, extra", [("sam", {}), ("fullbatch", {"epochs": 4, "fullbatch": {"chunk_size": 64}}),
                                           ("spartan", {"spartan": {"mutate_every": 2, "children": 2}})])
def test_lawa_averages_over_other_methods(tmp_path, method, extra):
    summary = train(_config(tmp_path, method=method, lawa={"k": 2}, **extra))
    assert summary["delivered"] == "lawa" and summary["lawa_checkpoints"] == 2 and summary["lawa_acc"] is not None


@pytest.mark.parametrize("extra", [{"accumulate": 2, "batch_size": 16}, {"amp": "bf16"}])
@pytest.mark.parametrize("average", [{"ema": {"decay": 0.9}}, {"lawa": {"k": 2}}])
def test_averages_compose_with_accumulation_and_bf16(tmp_path, extra, average):
    summary = train(_config(tmp_path, **average, **extra))
    assert summary["delivered"] in ("ema", "lawa") and summary["test_acc"] is not None
