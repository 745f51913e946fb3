"""--amp fp16: the loss scale on both of SAM's passes, overflow skips (the ascent too), the scaler in
checkpoints, and the refusals. CPUs have no fast fp16, so the CLI refuses it there; these tests reach
the same code through the library, on the CPU: fp32 with a power-of-two scale must give the unscaled
step bit for bit, and fp16 autocast (which the CPU runs, slowly) must overflow and recover."""

import json

import pytest
import torch
from torch import nn

from fastflat.loss import evaluation
from fastflat.cli import main
from fastflat.loss.closures import BatchClosure, SplitClosure
from fastflat.config import load_config
from fastflat.errors import NonFiniteError, UserError
from fastflat.methods import build_method
from fastflat.methods.base import MAX_OVERFLOWS_IN_A_ROW
from fastflat.data.models import build_model
from fastflat.flat import flatten
from fastflat.loop import resume, train

from helpers import StopAt


class Services:
    def __init__(self, scaler):
        self.scaler, self.resuming, self.steps_per_epoch, self.total_steps = scaler, False, 10, 10


def mlp():
    """fp16 convolutions crawl on a CPU (2 s a step for the small CNN); fp16 matmuls do not."""
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def setup(method="sam", scale=None, amp="none", model=None, **overrides):
    """The small CNN (or `model`), its flat buffer and a method; with `scale`, a GradScaler starting there."""
    torch.manual_seed(0)
    cfg = load_config(overrides={"dataset": "synthetic", "method": method, "momentum": 0.9, "weight_decay": 5e-4,
                                 "amp": amp, **overrides})
    model = model or build_model("cnn", 1, 10, 16)
    flat = flatten(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale is not None else None
    method = build_method(cfg)
    method.init(flat, Services(scaler))
    return cfg, model, flat, method, scaler


def batches(n=3, size=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 1, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method, overrides", [
    ("sgd", {}), ("sam", {}), ("sam", {"sam.m": 8}), ("sam", {"sam.adaptive": True, "sam.rho": 0.5}),
    ("sam", {"sam.norm": "linf", "sam.rho": 0.01}), ("sam", {"clip_grad": 0.1}),
])
def test_a_power_of_two_loss_scale_gives_the_unscaled_step_bit_for_bit(method, overrides):
    """Every pass's gradient arrives times 2^12; a step that forgot to unscale one of them, or
    unscaled one twice, moves the weights differently."""
    results = []
    for scale in (None, 2.0**12):
        _, model, flat, m, scaler = setup(method, scale, **overrides)
        for x, y in batches():
            m.step(flat, BatchClosure(model, flat, x, y, "none", scaler), lr=0.1)
        results.append((flat.params[0].clone(), m.optimizer.state_dict()["state"][0]["momentum_buffer"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_accumulated_micro_batches_are_scaled_each_and_unscaled_once():
    results = []
    for scale in (None, 2.0**10):
        _, model, flat, m, scaler = setup("sam", scale, accumulate=2)
        for x, y in batches():
            m.step(flat, SplitClosure(model, flat, list(zip(x.split(16), y.split(16))), "none", scaler), lr=0.1)
        results.append(flat.params[0].clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-7)


class OverflowOnce:
    """A closure whose first gradient (SAM's ascent) is inf, as an fp16 overflow leaves it."""

    def __init__(self, inner, flat):
        self.inner, self.flat, self.calls = inner, flat, 0
        self.batch_size, self.x, self.y = inner.batch_size, inner.x, inner.y

    def __getattr__(self, name):  # losses(), selected(), example_losses: ESAM's, from the real closure
        return getattr(self.inner, name)

    def __call__(self, backward=True, part=None, update_bn=True, **kwargs):
        self.calls += 1
        loss = self.inner(backward=backward, part=part, update_bn=update_bn, **kwargs)
        if self.calls == 1:
            self.flat.grads[0][0] = float("inf")
        return loss


@pytest.mark.parametrize("overrides", [{}, {"sam.m": 8}])
def test_an_overflowed_ascent_skips_the_second_pass_and_the_step_and_halves_the_scale(overrides):
    _, model, flat, m, scaler = setup("sam", 2.0**12, **overrides)
    (x, y), (x2, y2) = batches(2)
    m.step(flat, BatchClosure(model, flat, x2, y2, "none", scaler), lr=0.1)  # momentum exists
    weights, momentum = flat.params[0].clone(), m.optimizer.state_dict()["state"][0]["momentum_buffer"].clone()
    closure = OverflowOnce(BatchClosure(model, flat, x, y, "none", scaler), flat)
    metrics = m.step(flat, closure, lr=0.1)
    assert metrics["overflow"] and closure.calls == 1  # no perturbed pass at w + inf
    assert torch.equal(flat.params[0], weights)
    assert torch.equal(m.optimizer.state_dict()["state"][0]["momentum_buffer"], momentum)
    assert scaler.get_scale() == 2.0**11
    assert "overflow" not in m.step(flat, BatchClosure(model, flat, x, y, "none", scaler), lr=0.1)
    assert not torch.equal(flat.params[0], weights)


def test_fp16_autocast_overflows_at_a_huge_scale_then_trains():
    """Real fp16 backward on the CPU: at 2^40 the fp16 activation gradients overflow; each skipped
    step halves the scale until they fit, then the weights move and the loss falls."""
    torch.manual_seed(0)
    _, model, flat, m, scaler = setup("sam", 2.0**40, amp="fp16", model=mlp())
    (x, y), = batches(1, 64)
    start = flat.params[0].clone()
    skipped, losses = 0, []
    for _ in range(40):
        metrics = m.step(flat, BatchClosure(model, flat, x, y, "fp16", scaler), lr=0.05)
        if metrics.get("overflow"):
            assert torch.equal(flat.params[0], start)  # nothing moved yet
            skipped += 1
        else:
            losses.append(float(metrics["loss"]))
    assert 3 <= skipped < 40 and scaler.get_scale() <= 2.0 ** (40 - skipped) * 2
    assert losses[-1] < losses[0]


def test_a_gradient_no_scale_explains_is_a_non_finite_error():
    _, model, flat, m, scaler = setup("sgd", 2.0**12)
    (x, y), = batches(1)
    x = x.clone()  # a NaN input: NaN at every scale
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="fp16 steps in a row"):
        for _ in range(MAX_OVERFLOWS_IN_A_ROW):
            m.step(flat, BatchClosure(model, flat, x, y, "none", scaler), lr=0.1)


def test_fp16_is_refused_on_a_cpu_and_for_methods_without_a_scaled_gradient(tmp_path, capsys):
    for args, message in [(["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
                          (["--amp", "fp16", "--method", "es"], "fp16 (a loss-scaled gradient) applies to sgd and sam")]:
        code = main(["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # a refused start leaves no run directory


def test_an_fp16_run_interrupted_mid_epoch_resumes_bit_for_bit_with_its_loss_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "FP16_DEVICE_TYPES", ("cpu",))  # the CUDA-only guard, lifted for this test
    settings = {"dataset": "synthetic", "method": "sam", "amp": "fp16", "epochs": 2, "batch_size": 64, "name": "r"}
    torch.manual_seed(0)
    start = mlp().state_dict()

    def model():
        fresh = mlp()
        fresh.load_state_dict(start)
        return fresh

    whole = train(load_config(overrides={**settings, "out": str(tmp_path / "whole")}), model=model())
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides={**settings, "out": str(tmp_path / "cut")}), hooks=StopAt(step=11), model=model())
    resumed = resume(tmp_path / "cut" / "r", model=model())
    assert whole["loss_scale"] == resumed["loss_scale"] and whole["fp16_overflow_steps"] == resumed["fp16_overflow_steps"]
    a = torch.load(tmp_path / "whole" / "r" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "r" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"] == b["scaler"]
    assert json.loads((tmp_path / "whole" / "r" / "summary.json").read_text())["loss_scale"] > 0


def test_loss_scaler_is_none_without_fp16_and_refuses_a_cpu():
    assert evaluation.loss_scaler(torch.device("cpu"), "bf16") is None
    with pytest.raises(UserError, match="use --amp bf16 on a CPU"):
        evaluation.loss_scaler(torch.device("cpu"), "fp16")


# -- the drop-in fastflat.SAM with torch's GradScaler ---------------------------------------------------
def dropin_steps(flat_params, scale=None, clip=None, overflow_at=None):
    """Three steps of the documented drop-in recipe; returns the weights and the scaler."""
    import fastflat

    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, 16)
    if flat_params:
        fastflat.flatten(model)
    opt = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scale is not None)
    for i, (x, y) in enumerate(batches()):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if i == overflow_at:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        opt.first_step(zero_grad=True, scaler=scaler)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if clip is not None:
            scaler.unscale_(opt)
            fastflat.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
        if i == overflow_at:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # never left w
            assert all(torch.isfinite(b).all() for b in model.buffers())  # no pass at w + NaN fed BatchNorm
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), scaler


@pytest.mark.parametrize("flat_params", [False, True])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_dropin_with_a_grad_scaler_steps_as_without_one(flat_params, clip):
    plain, _ = dropin_steps(flat_params, clip=clip)
    scaled, scaler = dropin_steps(flat_params, scale=2.0**12, clip=clip)
    assert torch.equal(plain, scaled) and scaler.get_scale() == 2.0**12


@pytest.mark.parametrize("flat_params", [False, True])
def test_the_dropin_skips_a_step_whose_first_gradient_overflowed(flat_params):
    _, scaler = dropin_steps(flat_params, scale=2.0**12, overflow_at=1)
    assert scaler.get_scale() == 2.0**11
