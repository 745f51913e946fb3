"""SWA, snapshot ensembles and FGE: the papers' LR curves, when models are collected, ensemble math,
and runs on tiny synthetic data that resume mid-cycle to the same result."""

import json

import pytest
import torch

import fastflat
from fastflat.config import load_config
from fastflat.errors import UserError
from fastflat.analysis.ensemble import evaluate_members, mean_pairwise_disagreement, metrics_from_probs, validation_choice
from fastflat.methods import build_method
from fastflat.methods.schedules import fge_triangular, snapshot_cosine, swa_cyclic
from fastflat.loop import build_trainer, resume, train
from fastflat.runs.rundir import RunDir

from helpers import StopAt


def tiny(tmp_path, **overrides):
    base = {"dataset": "synthetic", "epochs": 4, "batch_size": 128, "out": str(tmp_path), "name": "run"}
    return load_config(overrides={**base, **overrides})


# -- schedules at known points -------------------------------------------------------------------------
def test_swa_cyclic_lr_goes_from_near_alpha1_to_alpha2_each_cycle():
    f = swa_cyclic(0.05, 0.01, 4)
    assert [f(s) for s in range(6)] == pytest.approx([0.04, 0.03, 0.02, 0.01, 0.04, 0.03])
    assert swa_cyclic(0.02, 0.02, 3)(7) == pytest.approx(0.02)  # constant variant


def test_fge_triangle_bottoms_out_at_half_cycle_and_peaks_at_its_end():
    f = fge_triangular(0.05, 0.0005, 4)
    assert [f(s) for s in range(5)] == pytest.approx([0.02525, 0.0005, 0.02525, 0.05, 0.02525])


def test_snapshot_cosine_restarts_every_ceil_t_over_m_steps():
    f = snapshot_cosine(0.1, 100, 4)  # period 25
    assert f(0) == pytest.approx(0.1) and f(25) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert f(12) == pytest.approx(0.05 * (1 + torch.cos(torch.tensor(torch.pi * 12 / 25)).item()))
    assert f(24) < 0.001


class FakeServices:
    def __init__(self, steps_per_epoch, epochs):
        self.steps_per_epoch, self.total_steps = steps_per_epoch, steps_per_epoch * epochs
        self.saved_at_lr, self.bn_updates, self.lr_now = [], 0, None

    def update_bn(self):
        self.bn_updates += 1

    def save_member(self, tag):
        self.saved_at_lr.append(self.lr_now)
        return tag


@pytest.mark.parametrize("cycle_epochs, cycles", [(2, 4), (0.5, 20), (1.4, 5)])  # 5 steps per epoch
def test_fge_collects_at_the_cycle_minimum_after_pretraining(cycle_epochs, cycles):
    """c = cycle_epochs x 5 iterations rounded to even (10, 2.5 -> 2, 7 -> 8), so t = 1/2 is a step."""
    cfg = load_config(overrides={"method": "fge", "epochs": 10, "fge.pretrain": 0.2, "fge.cycle_epochs": cycle_epochs})
    method, services = build_method(cfg), FakeServices(steps_per_epoch=5, epochs=10)
    flat = type("Flat", (), {"params": [torch.zeros(3)]})()
    method.inner.init = lambda flat, services: None  # no optimizer needed to follow the schedule
    method.init(flat, services)
    for step in range(services.total_steps):
        services.lr_now = method.lr(step, scheduled=cfg.lr)
        method.after_step(flat, step + 1)
    assert services.saved_at_lr == pytest.approx([cfg.fge.lr_min] * cycles)  # 40 steps after pretraining
    assert services.bn_updates == cycles and method.start_step == 10 and method.cycle % 2 == 0


# -- ensemble math ------------------------------------------------------------------------------------
def test_metrics_from_probs_accuracy_nll_and_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    labels = torch.tensor([0, 1, 1, 0])
    m = metrics_from_probs(probs, labels, bins=10)
    assert m["acc"] == pytest.approx(75.0)
    assert m["nll"] == pytest.approx(-torch.tensor([0.9, 0.4, 0.8, 0.7]).log().mean().item())
    # bins: 0.6 (wrong) -> |0.6 - 0|, 0.7 -> |0.7 - 1|, 0.8 -> |0.8 - 1|, 0.9 -> |0.9 - 1|
    assert m["ece"] == pytest.approx(100 * (0.6 + 0.3 + 0.2 + 0.1) / 4)


def test_disagreement_counts_differing_predictions_per_pair():
    preds = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]])
    assert mean_pairwise_disagreement(preds) == pytest.approx(100 * (1 / 4 + 2 / 4 + 1 / 4) / 3)


def test_ensemble_of_one_member_equals_that_member(tmp_path):
    trainer = build_trainer(tiny(tmp_path, epochs=1), RunDir.create(tmp_path, "t"))
    path = trainer.services.save_member("only")
    report = evaluate_members(trainer.model, [path], trainer.data.test, trainer.data)
    alone = trainer.services.evaluate()
    assert report["ensemble"]["acc"] == pytest.approx(alone["acc"])
    assert report["members"][0]["nll"] == pytest.approx(alone["loss"], rel=1e-5)
    assert report["disagreement"] == 0.0 and report["accuracy_by_size"] == [report["ensemble"]["acc"]]


def test_validation_choice_scores_last_k_ensembles_and_members_on_the_validation_split(tmp_path):
    # label noise keeps accuracies apart from 100%, so the choice is not a tie
    trainer = build_trainer(tiny(tmp_path, epochs=1, val_split=0.25, label_noise=0.4), RunDir.create(tmp_path, "t"))
    paths = []
    for tag in ("a", "b", "c"):
        for p in trainer.flat.params:  # three different members
            p.data.add_(0.05 * torch.randn_like(p))
        paths.append(trainer.services.save_member(tag))
    validation = trainer.validation
    choice = validation_choice(trainer.model, paths, validation, trainer.data)
    assert choice["size"] == len(validation) == 256
    for k in (1, 2, 3):  # the k-th point is the ensemble of the last k members, on validation
        alone = evaluate_members(trainer.model, paths[-k:], validation, trainer.data)["ensemble"]
        assert choice["last_k_acc"][k - 1] == pytest.approx(alone["acc"])
        assert choice["last_k_nll"][k - 1] == pytest.approx(alone["nll"], rel=1e-5)
    singles = [evaluate_members(trainer.model, [p], validation, trainer.data)["ensemble"] for p in paths]
    assert choice["member_acc"] == pytest.approx([m["acc"] for m in singles])
    best = max(range(3), key=lambda i: (singles[i]["acc"], -singles[i]["nll"]))
    assert choice["best_member"] == str(paths[best])
    assert choice["last_k_acc"][choice["best_k"] - 1] == max(choice["last_k_acc"])


# -- runs -------------------------------------------------------------------------------------------------
def test_swa_run_reports_final_and_averaged_weights(tmp_path):
    summary = train(tiny(tmp_path, method="swa", **{"swa.start": 2, "swa.lr": 0.02}))
    assert summary["swa_models_averaged"] == 8  # epochs 3 and 4, an average every quarter epoch (2 steps)
    assert summary["swa_acc"] > 50 and summary["test_acc"] > 50
    assert (tmp_path / "run" / "members" / "swa.pt").exists()
    # test_acc is the model SWA delivers, its average; the last iterate keeps its own name
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["delivered"] == "swa" and summary["test_acc"] == summary["swa_acc"]
    assert summary["test_loss"] == summary["swa_loss"] and summary["iterate_acc"] == last["test_acc"]


def test_swa_over_sam_is_one_flag(tmp_path):
    summary = train(tiny(tmp_path, method="sam", epochs=2, **{"swa.enabled": True, "swa.start": 1}))
    assert summary["swa_models_averaged"] == 4 and summary["method"] == "sam"  # epoch 2, every 2 steps


@pytest.mark.parametrize("method, pattern, count", [("sse", "snapshot-*.pt", 2), ("fge", "fge-*.pt", 4)])
def test_ensemble_methods_collect_members_and_report(tmp_path, method, pattern, count):
    summary = train(tiny(tmp_path, method=method))
    members = sorted((tmp_path / "run" / "members").glob(pattern))
    assert len(members) == count and len(summary["ensemble"]["members"]) == count



@pytest.mark.parametrize("method, extra", [("swa", {"swa.start": 1, "swa.cycle": 3}), ("fge", {})])
def test_killed_mid_cycle_resumes_to_the_same_result(tmp_path, method, extra):
    straight = train(tiny(tmp_path / "a", method=method, **extra))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "b", method=method, **extra), hooks=StopAt(step=13))
    resumed = resume(tmp_path / "b" / "run")
    for key in ("test_acc", "swa_acc"):
        assert resumed.get(key) == straight.get(key)
    if method == "fge":
        assert resumed["ensemble"]["ensemble"] == straight["ensemble"]["ensemble"]
    saved = json.loads((tmp_path / "b" / "run" / "summary.json").read_text())
    assert saved["steps"] == straight["steps"]


# -- budgets that cannot deliver are refused, defaults deliver ---------------------------------------------
class Budget:
    """What a wrapper's init reads of the trainer: the budget alone."""

    def __init__(self, steps_per_epoch, epochs):
        self.steps_per_epoch, self.total_steps = steps_per_epoch, steps_per_epoch * epochs


def planned(method, steps_per_epoch, epochs, **overrides):
    wrapper = build_method(load_config(overrides={"method": method, "epochs": epochs, **overrides}))
    wrapper.init(fastflat.flatten(torch.nn.Linear(2, 2)), Budget(steps_per_epoch, epochs))
    return wrapper


@pytest.mark.parametrize("method", ["swa", "sse", "fge"])
def test_defaults_deliver_what_the_method_promises_on_real_data_sizes(method):
    """Fashion-MNIST with the default batch (468 steps an epoch) and the default 2 epochs:
    last round, SWA's defaults averaged 0 models and said nothing."""
    wrapper = planned(method, 468, 2)
    promised = {"swa": lambda w: w.planned >= 2, "fge": lambda w: w.planned >= 2, "sse": lambda w: True}
    assert promised[method](wrapper)


def test_swa_defaults_average_several_models_in_a_real_run(tmp_path):
    summary = train(tiny(tmp_path, method="swa", epochs=2))  # every default but the data
    assert summary["swa_models_averaged"] == 2 and (tmp_path / "run" / "members" / "swa.pt").exists()


def test_fge_pretraining_is_counted_in_steps_not_rounded_to_whole_epochs():
    wrapper = planned("fge", 8, 1, **{"fge.pretrain": 0.5, "fge.cycle_epochs": 0.25})
    assert wrapper.start_step == 4 and wrapper.planned == 2  # was: round(0.5 epochs) = 0 epochs of pretraining


def test_fge_readme_protocol_collects_the_8_models_it_promises():
    """16 epochs, --val-split 0.1 (54,000 examples: 421 steps an epoch), pretrain 0.5, cycles of 1 epoch."""
    assert planned("fge", 421, 16, **{"fge.pretrain": 0.5, "fge.cycle_epochs": 1}).planned == 8


@pytest.mark.parametrize("method, overrides, says", [
    ("swa", {"swa.start": 0.99}, "SWA would average 0 model(s)"),
    ("swa", {"swa.start": 1, "swa.cycle": 8}, "use --swa-cycle 4 or --epochs 3"),
    ("fge", {"fge.cycle_epochs": 2}, "FGE would collect 1 model(s)"),
    ("sse", {"sse.cycles": 6}, "use --sse-cycles 4"),
])
def test_a_budget_that_cannot_deliver_is_refused_with_settings_that_work(method, overrides, says):
    with pytest.raises(UserError) as raised:
        planned(method, 2, 2, **overrides) if method == "sse" else planned(method, 8, 2, **overrides)
    assert says in str(raised.value)


@pytest.mark.parametrize("overrides", [{"swa.start": 0.99}, {"swa.start": 1, "swa.cycle": 8},
                                       {"swa.start": 0.5, "swa.cycle": 6}])
def test_every_settings_swa_suggests_for_a_refused_budget_works(overrides):
    with pytest.raises(UserError) as raised:
        planned("swa", 8, 2, **overrides)
    suggestions = str(raised.value).split("; use ")[1].split(" or ")
    assert suggestions
    for suggestion in suggestions:
        flag, value = suggestion.split()
        key = {"--swa-start": "swa.start", "--swa-cycle": "swa.cycle", "--epochs": "epochs"}[flag]
        fixed = {**overrides, key: float(value) if key == "swa.start" else int(value)}
        epochs = fixed.pop("epochs", 2)
        assert planned("swa", 8, epochs, **fixed).planned >= 2, suggestion


def test_fge_suggested_cycle_works():
    with pytest.raises(UserError) as raised:
        planned("fge", 8, 2, **{"fge.cycle_epochs": 2})
    cycle = float(str(raised.value).split("--fge-cycle-epochs ")[1].split(",")[0])
    assert planned("fge", 8, 2, **{"fge.cycle_epochs": cycle}).planned >= 2


@pytest.mark.parametrize("key", ["schedule", "warmup_epochs"])
@pytest.mark.parametrize("method", ["swa", "sse", "fge"])
def test_schedule_and_warmup_are_refused_where_the_method_owns_the_lr(method, key):
    with pytest.raises(UserError) as raised:
        load_config(overrides={"method": method, key: "step" if key == "schedule" else 1.0})
    assert f"{key} cannot be combined with {method}" in str(raised.value)
