"""The SAM variants in the trainer (--sam-variant, --sam-only, --sam-every / --sam-prob / --sam-from): one
step of each against its paper's formula written out here with plain autograd in fp64, the passes each
step takes, and the schedules' choice of steps."""

import re

import pytest
import torch
from torch import nn

from fastflat.config import load_config
from fastflat.errors import UserError
from fastflat.flat import flatten
from fastflat.loop.steps import train_step
from fastflat.loss.closures import BatchClosure
from fastflat.methods import build_method

LR, RHO = 0.1, 0.05


class Services:
    steps_per_epoch, total_steps, resuming, scaler = 10, 100, False, None

    def update_bn(self):
        pass


class Counting(BatchClosure):
    """A BatchClosure that counts its passes with a gradient and the examples of the selected pass."""

    def __init__(self, *args):
        super().__init__(*args)
        self.passes, self.selected_examples = 0, None

    def __call__(self, *args, **kwargs):
        self.passes += kwargs.get("backward", True)
        return super().__call__(*args, **kwargs)

    def selected(self, chosen, update_bn=False):
        self.passes += 1
        self.selected_examples = int(chosen.sum())
        return super().selected(chosen, update_bn)


def data(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def setup(momentum=0.0, **sam):
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    flat = flatten(model)
    cfg = load_config(overrides={"method": "sam", "lr": LR, "momentum": momentum, "nesterov": False, "weight_decay": 0.0, "sam.rho": RHO,
                                 **{f"sam.{k}": v for k, v in sam.items()}})
    method = build_method(cfg)
    method.init(flat, Services())
    return model, flat, method


def grad_at(model, w, x, y):
    """Gradient of the mean cross-entropy at flat weights w, by plain autograd (no fastflat op)."""
    weight, bias = w[:15].reshape(3, 5).clone().requires_grad_(), w[15:].clone().requires_grad_()
    loss = nn.functional.cross_entropy(x @ weight.T + bias, y)
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, (weight, bias))])


def one_step(flat, method, model, x, y, step=0):
    closure = Counting(model, flat, x, y)
    train_step(method, flat, closure, LR, step)
    return closure


def test_gsam_descends_with_the_sam_gradient_minus_alpha_times_the_orthogonal_part():
    model, flat, method = setup(variant="gsam", gsam_alpha=0.3)
    x, y = data()
    w = flat.params[0].detach().clone()
    g = grad_at(model, w, x, y)
    g_sam = grad_at(model, w + RHO * g / g.norm(), x, y)
    g_perp = g - (g @ g_sam) / (g_sam @ g_sam) * g_sam  # g's part orthogonal to g'
    one_step(flat, method, model, x, y)
    torch.testing.assert_close(flat.params[0], w - LR * (g_sam - 0.3 * g_perp))


def test_gsam_radius_falls_with_the_learning_rate():
    _, _, method = setup(variant="gsam", gsam_rho_min=0.01)
    assert method.ascent_rho(LR) == pytest.approx(RHO)
    assert method.ascent_rho(LR / 2) == pytest.approx(0.01 + (RHO - 0.01) / 2)
    assert method.ascent_rho(0.0) == pytest.approx(0.01)


def test_fsam_ascends_along_the_gradient_minus_sigma_times_its_ema():
    model, flat, method = setup(variant="fsam", fsam_sigma=0.8, fsam_lambda=0.6)
    x, y = data(32)
    w0 = flat.params[0].detach().clone()
    g0 = grad_at(model, w0, x[:16], y[:16])
    one_step(flat, method, model, x[:16], y[:16])  # the first step: m = g0, the ascent along g0
    torch.testing.assert_close(flat.params[0], w0 - LR * grad_at(model, w0 + RHO * g0 / g0.norm(), x[:16], y[:16]))
    w1 = flat.params[0].detach().clone()
    g1 = grad_at(model, w1, x[16:], y[16:])
    direction = g1 - 0.8 * g0
    one_step(flat, method, model, x[16:], y[16:], step=1)
    expected = w1 - LR * grad_at(model, w1 + RHO * direction / direction.norm(), x[16:], y[16:])
    torch.testing.assert_close(flat.params[0], expected)
    torch.testing.assert_close(method.variant.momentum[0], 0.6 * g0 + 0.4 * g1)


@pytest.mark.parametrize("decouple", [False, True])
def test_wsam_adds_gamma_over_one_minus_gamma_times_the_sharpness_gradient(decouple):
    model, flat, method = setup(variant="wsam", wsam_gamma=0.8, wsam_decouple=decouple)
    x, y = data()
    w = flat.params[0].detach().clone()
    g = grad_at(model, w, x, y)
    g_sam = grad_at(model, w + RHO * g / g.norm(), x, y)
    one_step(flat, method, model, x, y)
    # plain SGD: the coupled and the decoupled forms land on the same point
    torch.testing.assert_close(flat.params[0], w - LR * (g + 4.0 * (g_sam - g)))


def test_msam_takes_one_pass_at_a_step_back_along_the_momentum():
    model, flat, method = setup(momentum=0.9, variant="msam")
    x, y = data()
    w0 = flat.params[0].detach().clone()
    assert one_step(flat, method, model, x, y).passes == 1  # no momentum yet: a plain SGD step
    v = grad_at(model, w0, x, y)
    w1 = flat.params[0].detach().clone()
    torch.testing.assert_close(w1, w0 - LR * v)
    assert one_step(flat, method, model, x, y, step=1).passes == 1
    v = 0.9 * v + grad_at(model, w1 - RHO * v / v.norm(), x, y)
    torch.testing.assert_close(flat.params[0], w1 - LR * v)


def test_looksam_reuses_the_orthogonal_part_between_its_full_steps():
    model, flat, method = setup(variant="looksam", looksam_k=3, looksam_alpha=0.5)
    x, y = data()
    passes = []
    for step in range(4):
        w = flat.params[0].detach().clone()
        g = grad_at(model, w, x, y)
        if step % 3 == 0:
            g_sam = grad_at(model, w + RHO * g / g.norm(), x, y)
            g_v = g_sam - (g @ g_sam) / (g @ g) * g
            expected = w - LR * g_sam
        else:
            expected = w - LR * (g + 0.5 * g.norm() / g_v.norm() * g_v)
        passes.append(one_step(flat, method, model, x, y, step).passes)
        torch.testing.assert_close(flat.params[0], expected)
    assert passes == [2, 1, 1, 2]


def test_esam_moves_a_beta_share_of_the_weights_and_redoes_the_gamma_share_of_examples():
    model, flat, method = setup(variant="esam", esam_beta=0.5, esam_gamma=0.25)
    x, y = data()
    w = flat.params[0].detach().clone()
    closure = Counting(model, flat, x, y)
    seen = {}
    real = closure.selected

    def spy(chosen, update_bn=False):
        seen["moved"] = (flat.params[0] != w).double()  # inside the second pass: w + e
        seen["e"] = flat.params[0].detach() - w
        return real(chosen, update_bn)

    closure.selected = spy
    train_step(method, flat, closure, LR, 0)
    assert closure.passes == 2 and closure.selected_examples == 4
    moved = seen["moved"]
    assert 0 < moved.sum() < len(w)  # a random subset of the 18 weights moved
    torch.testing.assert_close(seen["e"].norm(), torch.tensor(RHO, dtype=torch.float64))  # still of length rho
    g = grad_at(model, w, x, y)
    torch.testing.assert_close(seen["e"], RHO * g * moved / (g * moved).norm())


def test_sam_on_moves_only_normalization_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    flat = flatten(model)
    cfg = load_config(overrides={"method": "sam", "lr": LR, "weight_decay": 0.0, "sam.only": "norm"})
    method = build_method(cfg)
    method.init(flat, Services())
    masks = method.norm_masks[0]
    assert masks.sum() == 8 and masks[24:32].eq(1).all()  # BatchNorm's 4 scales and 4 shifts, after 5x4 + 4
    x, y = data()
    w, moved = flat.params[0].detach().clone(), {}
    closure = Counting(model, flat, x, y)
    real = closure.__class__.__call__

    def spy(self, *args, **kwargs):
        if kwargs.get("update_bn") is False:
            moved["where"] = flat.params[0] != w
        return real(self, *args, **kwargs)

    closure.__class__ = type("Spy", (Counting,), {"__call__": spy})
    train_step(method, flat, closure, LR, 0)
    assert moved["where"].nonzero().flatten().tolist() == list(range(24, 32))


def test_sam_on_refuses_a_model_without_normalization_layers():
    with pytest.raises(UserError, match="has none"):
        setup(only="norm")


@pytest.mark.parametrize("schedule, expected", [
    ({"every": 3}, [0, 3, 6, 9]),
    ({"start": 0.5}, [5, 6, 7, 8, 9]),  # < 1: a fraction of the run's steps (10 here)
])
def test_schedules_choose_the_ascending_steps(schedule, expected):
    _, _, method = setup(**schedule)
    method.services.total_steps = 10
    assert [s for s in range(10) if method.ascends(s)] == expected


def test_sam_from_an_epoch_count_and_random_sam_are_seeded_and_near_their_rate():
    _, _, method = setup(start=2)  # >= 1: epochs (10 steps each)
    assert [s for s in range(30) if method.ascends(s)] == list(range(20, 30))
    _, _, method = setup(prob=0.2)
    chosen = [method.ascends(s) for s in range(2000)]
    assert chosen == [method.ascends(s) for s in range(2000)]  # the same draws again: a resume agrees
    assert 0.17 < sum(chosen) / 2000 < 0.23


def test_a_plain_step_of_a_schedule_takes_one_pass():
    model, flat, method = setup(every=2)
    x, y = data()
    assert [one_step(flat, method, model, x, y, s).passes for s in range(4)] == [2, 1, 2, 1]


@pytest.mark.parametrize("bad, message", [
    ({"sam.variant": "gsam", "sam.m": 4}, "m-sharpness is SAM's"),
    ({"sam.every": 0}, "must be >= 1"),
    ({"sam.prob": 1.5}, "must be in [0, 1]"),
    ({"sam.wsam_gamma": 1.0}, "must be in [0, 1)"),
    ({"sam.variant": "msam", "momentum": 0}, "give --momentum > 0"),
    ({"sam.variant": "msam", "optimizer": "rmsprop"}, "does not keep"),
    ({"sam.variant": "fsam", "sam.sync_ascent": True}, "already ascends the same way"),
    ({"sam.variant": "wsam", "optimizer": "schedulefree-sgd", "schedule": "constant"}, "add --no-wsam-decouple"),
])
def test_settings_that_do_not_fit_are_refused(bad, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(overrides={"method": "sam", **bad})


def test_bench_rows_count_the_passes_of_each_variant_and_schedule():
    from fastflat.bench.train import TrainSettings, run_train

    rows = run_train(TrainSettings(model="cnn", methods=["sgd", "looksam", "sam-every5", "sam-from0.8", "esam", "msam"],
                                   steps=5, warmup=0, batch_size=4))
    passes = {r["method"]: r["passes_per_step"] for r in rows}
    assert all(r["status"] == "ok" and r["ratio_to_sgd"] > 0 for r in rows)
    # LookSAM (k = 5) and --sam-every 5: two passes on 1 step of 5; --sam-from 0.8: on the last of 5
    assert passes == {"sgd": 1, "looksam": 1.2, "sam-every5": 1.2, "sam-from0.8": 1.2, "esam": 2, "msam": 1}
