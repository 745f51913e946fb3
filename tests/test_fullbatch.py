"""Full-batch GD with the gradient-norm penalty: the regularizer's gradient against double backward,
blocks, chunk-size independence, global-norm clipping, exact resume, bad input."""

import pytest
import torch
from torch import nn

import fastflat
from fastflat.loss.closures import SplitClosure
from fastflat.config import load_config
from fastflat.errors import UserError
from fastflat.methods.fullbatch import FullBatch, exact_hvp
from fastflat.loop import resume, train

from helpers import StopAt


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)  # no BatchNorm
    return model, fastflat.flatten(model)


def data(n=96, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 4, 4, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def chunks(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def explicit(model, x, y, tau):
    """grad of L + (tau/4)||grad L||^2 and H g, straight from autograd on the whole data."""
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    hg = torch.autograd.grad(sum((gi * gi.detach()).sum() for gi in g), params)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts]).detach()  # noqa: E731
    return flat(g) + tau / 2 * flat(hg), flat(hg)


def method(gradreg, **fullbatch):
    cfg = load_config(overrides={"method": "fullbatch", "momentum": 0.0, "weight_decay": 0.0,
                                 "fullbatch.gradreg": gradreg, **{f"fullbatch.{k}": v for k, v in fullbatch.items()}})
    return FullBatch(cfg)


def test_exact_hvp_is_double_backward():
    model, flat = mlp()
    x, y = data()
    _, hg = explicit(model, x, y, tau=0.0)
    closure = SplitClosure(model, flat, chunks(x, y, 17))
    closure(backward=True)
    g = [v.clone() for v in flat.grads]
    torch.testing.assert_close(exact_hvp(flat, closure, None, g)[0], hg, rtol=1e-4, atol=1e-6)


def test_finite_difference_hvp_converges_to_double_backward_as_eps_shrinks():
    model, flat = mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    _, hg = explicit(model, x, y, tau=0.0)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        m = method("finite", eps=eps)
        m.init(flat)
        closure = SplitClosure(model, flat, chunks(x, y, 32))
        closure(backward=True)
        g = [v.clone() for v in flat.grads]
        errors.append((m._finite_hvp(flat, closure, None, g)[0] - hg).norm().item() / hg.norm().item())
    assert errors[0] > errors[1] > errors[2] and errors[1] < 0.05  # first order in eps: about 10x each


@pytest.mark.parametrize("gradreg, tol", [("exact", 1e-5), ("finite", 2e-3)])
def test_a_step_descends_the_regularized_objective(gradreg, tol):
    model, flat = mlp()
    x, y = data()
    lr = 0.3
    expected_grad, _ = explicit(model, x, y, tau=0.5 * lr / 2)  # tau tied to the step: strength 0.5
    w0 = flat.params[0].clone()
    m = method(gradreg)
    m.init(flat)
    m.step(flat, SplitClosure(model, flat, chunks(x, y, 40)), lr)
    torch.testing.assert_close((w0 - flat.params[0]) / lr, expected_grad, rtol=tol, atol=tol * 1e-2)


def test_block_penalty_averages_each_blocks_own_regularized_gradient():
    model, flat = mlp()
    x, y = data()
    lr, tau = 0.3, 0.2
    expected = sum(explicit(model, x[i : i + 32], y[i : i + 32], tau)[0] for i in range(0, 96, 32)) / 3
    w0 = flat.params[0].clone()
    m = method("exact", block=32, tau=tau, chunk_size=64)
    m.init(flat)
    m.step(flat, SplitClosure(model, flat, chunks(x, y, 64)), lr)
    torch.testing.assert_close((w0 - flat.params[0]) / lr, expected, rtol=1e-5, atol=1e-7)


def tiny(out, **overrides):
    base = {"method": "fullbatch", "dataset": "synthetic", "epochs": 4, "out": str(out), "name": "run",
            "model": "cnn", "subset": 256, "fullbatch.chunk_size": 64}
    return load_config(overrides={**base, **overrides})


def weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("gradreg", ["off", "finite", "exact"])
def test_chunk_size_changes_nothing_but_rounding(gradreg):
    """Without BatchNorm (with it, each chunk normalises by its own statistics: ghost batches)."""
    after = []
    for size in (7, 32, 96):
        model, flat = mlp()
        x, y = data()
        m = method(gradreg, chunk_size=size)
        m.init(flat)
        for _ in range(2):
            m.step(flat, SplitClosure(model, flat, chunks(x, y, size)), lr=0.3)
        after.append(flat.params[0].clone())
    for other in after[1:]:
        torch.testing.assert_close(other, after[0], rtol=1e-4, atol=1e-6)


def test_clipping_acts_on_the_global_norm(tmp_path):
    model, flat = mlp()
    x, y = data()
    cfg = load_config(overrides={"method": "fullbatch", "momentum": 0.0, "weight_decay": 0.0, "clip_grad": 1e-3})
    m = FullBatch(cfg)
    m.init(flat)
    w0 = flat.params[0].clone()
    m.step(flat, SplitClosure(model, flat, chunks(x, y, 50)), lr=1.0)
    assert (flat.params[0] - w0).norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_a_killed_full_batch_run_resumes_to_the_same_weights(tmp_path):
    extra = {"fullbatch.gradreg": "finite", "fullbatch.block": 32, "clip_grad": 0.25}
    train(tiny(tmp_path / "a", **extra))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "b", **extra), hooks=StopAt(step=2))
    resume(tmp_path / "b" / "run")
    a, b = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, says", [
    ({"fullbatch.chunk_size": 0}, "fullbatch.chunk_size = 0"),
    ({"fullbatch.chunk_size": 64, "fullbatch.block": 48}, r"must be 0 \(the whole set\) or divide"),
    ({"fullbatch.tau": -1.0}, "fullbatch.tau = -1.0"),
    ({"method": "sgd", "fullbatch.gradreg": "finite"}, "apply to --method fullbatch only"),
])
def test_bad_full_batch_settings_are_refused(overrides, says):
    with pytest.raises(UserError, match=says):
        load_config(overrides={"method": "fullbatch", **overrides})


def test_a_chunk_larger_than_the_training_set_is_refused(tmp_path):
    with pytest.raises(UserError, match="chunk_size 4096 is larger than the 256"):
        train(tiny(tmp_path, **{"fullbatch.chunk_size": 4096}))
    assert not (tmp_path / "run").exists()


def test_every_ready_config_loads_and_the_cpu_rows_train(tmp_path):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "fullbatch"
    configs = sorted(folder.glob("*.yaml"))
    assert {c.stem for c in configs} >= {f"cifar10-{r}" for r in ("baseline", "longer", "clipped", "regularized",
                                                                   "strong-reg", "in-practice")}
    for path in configs:
        cfg = load_config(path)
        assert cfg.method in ("fullbatch", "sgd")
        if path.stem.startswith("fmnist"):  # 2 steps on the synthetic set: the same code path as the real row
            quick = {"dataset": "synthetic", "epochs": 2, "subset": 128, "out": str(tmp_path), "name": path.stem}
            if cfg.method == "fullbatch":
                quick["fullbatch.chunk_size"] = 128  # the whole 128-example subset; blocks of 128 or 32 fit
            summary = train(load_config(path, quick))
            assert summary["steps"] == (2 if cfg.method == "fullbatch" else 2 * (128 // cfg.batch_size))


def test_full_batch_takes_the_papers_optimizer_settings_unless_told_otherwise():
    cfg = load_config(overrides={"method": "fullbatch"})
    assert (cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.9, True, 5e-4)
    assert load_config(overrides={"method": "fullbatch", "nesterov": False}).nesterov is False
    assert load_config(overrides={"method": "sgd", "nesterov": False}).nesterov is False
    assert load_config(overrides={"method": "sgd", "momentum": 0.0}).nesterov is False  # the default yields too
    assert load_config(overrides={"method": "fullbatch", "momentum": 0.0}).nesterov is False  # no clash


def test_fixed_augment_enlarges_the_training_set_once(tmp_path):
    from fastflat import data as datasets

    data = datasets.load_dataset("synthetic")
    copies = datasets.augmented_copies(data.train, 3, seed=0)
    assert len(copies) == 3 * len(data.train) and torch.equal(copies.labels[: len(data.train)], data.train.labels)
    assert not torch.equal(copies.images[: len(data.train)], copies.images[len(data.train):2 * len(data.train)])
    again = datasets.augmented_copies(data.train, 3, seed=0)
    assert torch.equal(again.images, copies.images)  # made once, from the seed: resumable
    summary = train(tiny(tmp_path, epochs=1, **{"fullbatch.fixed_augment": 2, "fullbatch.chunk_size": 128}))
    assert summary["train_size"] == 2 * 256


def test_swa_over_full_batch_averages_full_batch_steps(tmp_path):
    """The one wrapper full batch takes: SWA counts its cycles in (full-batch) steps."""
    summary = train(tiny(tmp_path, epochs=8, **{"swa.enabled": True}))
    assert summary["swa_models_averaged"] == 2 and summary["steps"] == 8  # steps 7 and 8: start 0.75, cycle 1
