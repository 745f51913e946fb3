"""Spartan training and pure ES: the ES update's arithmetic, antithetic cancellation, the grad mutation's
no-worse rule, batched scoring, the evolution split, and exact resume."""

import json

import pytest
import torch

import fastflat
from fastflat.config import load_config
from fastflat.methods import spartan as sp
from fastflat.methods.population import population_scores
from fastflat.runs.rundir import RunDir
from fastflat.loop import build_trainer, resume, train

from helpers import StopAt


def tiny(tmp_path, **overrides):
    base = {"dataset": "synthetic", "epochs": 2, "batch_size": 128, "out": str(tmp_path), "name": "run",
            "method": "spartan", "spartan.children": 6}
    return load_config(overrides={**base, **overrides})


def _trainer(tmp_path, **overrides):
    return build_trainer(tiny(tmp_path, **overrides), RunDir.create(tmp_path, "t"))


def _fixed_scores(losses):
    def fake(flat, write_child, count, batches, chunk):
        out = torch.empty_like(flat.params[0])
        for i in range(count):
            write_child(i, out)  # still build every child, as the real scorer does
        return torch.tensor(losses, dtype=torch.float32), torch.zeros(count)
    return fake


def test_shaped_rewards_normalise_and_rank():
    r = torch.tensor([3.0, 1.0, 2.0, 10.0])
    assert sp.shape_rewards(r, "ranks").tolist() == pytest.approx([1 / 6, -0.5, -1 / 6, 0.5])
    z = sp.shape_rewards(r, "normalize")
    assert z.mean().item() == pytest.approx(0, abs=1e-6) and z.std(unbiased=False).item() == pytest.approx(1, rel=1e-5)
    assert sp.shape_rewards(torch.ones(4), "ranks").abs().sum() == 0


@pytest.mark.parametrize("antithetic", [True, False])
def test_es_update_equals_the_explicit_sum_over_materialised_noise(tmp_path, monkeypatch, antithetic):
    trainer = _trainer(tmp_path, **{"spartan.antithetic": antithetic, "spartan.shaping": "ranks"})
    cfg, w0 = trainer.cfg, trainer.flat.params[0].clone()
    losses = [0.5, 0.9, 0.1, 0.7, 0.3, 0.2]
    monkeypatch.setattr(sp, "population_scores", _fixed_scores(losses))
    sp.es_update_(trainer.flat, cfg, seed=11, batches=[])
    shaped = sp.shape_rewards(-torch.tensor(losses), "ranks")
    n, k, s = w0.numel(), cfg.spartan.children, cfg.spartan.sigma
    if antithetic:
        eps = [fastflat.member_noise(11, j, n) for j in range(k // 2)]
        step = sum((shaped[2 * j] - shaped[2 * j + 1]) * eps[j] for j in range(k // 2))
    else:
        step = sum(shaped[j] * fastflat.member_noise(11, j, n) for j in range(k))
    expected = w0 + cfg.spartan.es_lr / (k * s) * step
    torch.testing.assert_close(trainer.flat.params[0], expected, rtol=1e-5, atol=1e-8)


def test_antithetic_pairs_cancel_exactly_on_constant_fitness(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    w0 = trainer.flat.params[0].clone()
    monkeypatch.setattr(sp, "population_scores", _fixed_scores([0.4] * 6))
    sp.es_update_(trainer.flat, trainer.cfg, seed=3, batches=[])
    assert torch.equal(trainer.flat.params[0], w0)


def test_grad_mutation_never_replaces_the_parent_with_a_worse_child(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, **{"spartan.mutation": "grad"})
    method, flat = trainer.method, trainer.flat
    w0 = flat.params[0].clone()
    parent_loss, _ = sp.parent_scores(flat, trainer.services.holdout_batches("evolution", trainer.cfg.spartan.fitness_examples))
    monkeypatch.setattr(sp, "population_scores", _fixed_scores([parent_loss + 0.01 * i for i in range(6)]))
    _, replaced = method._grad_mutation(flat, 5, trainer.services.holdout_batches("evolution", trainer.cfg.spartan.fitness_examples), parent_loss)
    assert not replaced and torch.equal(flat.params[0], w0)


def test_grad_mutation_rounds_never_raise_the_parents_loss(tmp_path):
    train(tiny(tmp_path, epochs=3, **{"spartan.mutation": "grad"}))
    rounds = [json.loads(x) for x in (tmp_path / "run" / "evolution.jsonl").read_text().splitlines()]
    assert len(rounds) == 3
    assert all(r["heldout_loss"] <= r["parent_loss"] + 1e-6 for r in rounds)


@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])  # vmap reads conv weights by their strides
def test_batched_scoring_equals_one_child_at_a_time(tmp_path, layout):
    trainer = _trainer(tmp_path, model="cnn", memory_format=layout)
    assert trainer.flat.channels_last == (layout == "channels-last")
    flat, batches = trainer.flat, trainer.services.holdout_batches("evolution", trainer.cfg.spartan.fitness_examples)[:1]
    parent = flat.params[0].clone()

    def write_child(i, out):
        fastflat.ops.noise.perturb_into_(out, parent, 9, i, 0.05)

    vmapped = population_scores(flat, write_child, 5, batches, chunk=3)
    one_by_one = population_scores(flat, write_child, 5, batches, chunk=1)
    torch.testing.assert_close(vmapped[0], one_by_one[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(vmapped[1], one_by_one[1]) and torch.equal(flat.params[0], parent)


def test_evolution_split_is_held_out_from_sgd(tmp_path):
    summary = train(tiny(tmp_path, epochs=1, **{"spartan.evolution_split": 0.25}))
    assert summary["evolution_split_size"] == 256 and summary["train_size"] == 1024 - 256



@pytest.mark.parametrize("mutation", ["es", "grad"])
def test_resumed_spartan_run_reproduces_the_same_children(tmp_path, mutation):
    extra = {"spartan.mutation": mutation}
    train(tiny(tmp_path / "a", epochs=3, **extra))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "b", epochs=3, **extra), hooks=StopAt(step=9))
    resume(tmp_path / "b" / "run")
    logs = [(tmp_path / d / "run" / "evolution.jsonl").read_text() for d in ("a", "b")]
    assert logs[0] == logs[1]
    weights = [torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False)["model"] for d in "ab"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_pure_es_runs_end_to_end_without_gradients(tmp_path):
    summary = train(tiny(tmp_path, method="es", epochs=1, **{"spartan.es_lr": 1e-4}))
    assert summary["steps"] == 8 and summary["train_loss"] > 0 and (tmp_path / "run" / "checkpoint.pt").exists()


def test_es_generations_lower_the_loss_without_gradients():
    """A linear classifier on one fixed batch: 60 OpenAI-ES generations, no backward pass anywhere.
    (On the synthetic CNN task, 16 children and a few dozen generations do not beat chance: ES
    needs far more generations than SGD needs steps, which is why Spartan interleaves it with SGD.)"""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    flat = fastflat.flatten(model)
    x, y = torch.randn(64, 16), torch.arange(64) % 4
    cfg = load_config(overrides={"spartan.children": 32, "spartan.sigma": 0.05, "spartan.es_lr": 0.02})

    def loss():
        return torch.nn.functional.cross_entropy(model(x), y).item()

    before = loss()
    with torch.no_grad():
        for generation in range(60):
            sp.es_update_(flat, cfg, sp.round_seed(0, generation), [(x, y)])
    assert loss() < 0.9 * before and all(g.abs().sum() == 0 for g in flat.grads)  # 1.44 -> 1.15


@pytest.mark.parametrize("antithetic", [False, True])
def test_constant_fitness_leaves_the_weights_bitwise_unchanged(monkeypatch, antithetic):
    """The documented contract: no signal, no step (without pairs it moved weights by up to 1.9e-3)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    flat = fastflat.flatten(model)
    before = flat.params[0].clone()
    monkeypatch.setattr(sp, "population_scores", _fixed_scores([0.7310585786] * 16))
    cfg = load_config(overrides={"spartan.children": 16, "spartan.antithetic": antithetic, "spartan.es_lr": 1.0})
    sp.es_update_(flat, cfg, 3, [(torch.randn(4, 16), torch.zeros(4, dtype=torch.long))])
    assert torch.equal(flat.params[0], before)
