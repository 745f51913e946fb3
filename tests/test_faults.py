"""Faults where they hurt: Ctrl-C inside a step, a kill between two writes, a torn log line, NaN,
a second process on the same run, leftovers of crashes. Each test failed on the code before it."""

import contextlib
import json

import pytest
import torch

from fastflat.loss import closures
from fastflat import data as datasets
from fastflat.config import load_config
from fastflat.errors import NonFiniteError, UserError
from fastflat.methods.spartan import shape_rewards
from fastflat.runs.rundir import RunDir
from fastflat.loop import resume, train

from helpers import StopAt, send_sigint

TIMING = ("epoch_seconds", "samples_per_s")  # wall-clock fields: the only ones allowed to differ


def tiny(out, **overrides):
    base = {"dataset": "synthetic", "epochs": 2, "batch_size": 128, "out": str(out), "name": "run"}
    return load_config(overrides={**base, **overrides})


def state(run_dir):
    """Every tensor of the saved model: weights and BatchNorm buffers (num_batches_tracked too)."""
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def records(run_dir, name="metrics.jsonl"):
    lines = (run_dir / name).read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {name}")) for line in lines]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in strict]


def assert_same_run(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "weights or BN buffers differ"
    assert records(a) == records(b)


@pytest.fixture
def sigint_in_sams_second_pass(monkeypatch):
    """Ctrl-C while SAM's perturbed pass runs (weights at w + e, BatchNorm frozen), at given calls."""
    calls, at = [0], set()
    real = closures.frozen_bn_stats

    @contextlib.contextmanager
    def interrupted(model):
        calls[0] += 1
        with real(model):
            if calls[0] in at:
                send_sigint()
            yield

    monkeypatch.setattr(closures, "frozen_bn_stats", interrupted)
    return at, calls


def test_ctrl_c_inside_sams_second_pass_resumes_bitwise(tmp_path, sigint_in_sams_second_pass):
    at, calls = sigint_in_sams_second_pass
    train(tiny(tmp_path / "straight", method="sam"))
    broken = tmp_path / "broken" / "run"
    calls[0] = 0
    at.update({3, 9, 14})  # one second pass per step, counted across resumes: steps 3, 9 and 14 of 16
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "broken", method="sam"))
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            resume(broken)
    saved = torch.load(broken / "checkpoint.pt", weights_only=True)["position"]
    assert saved["step"] == 14 and saved["batch"] == 6  # the step in flight finished, then it stopped
    resume(broken)
    assert_same_run(tmp_path / "straight" / "run", broken)


def test_resumed_epoch_reports_the_whole_epochs_training_loss(tmp_path):
    train(tiny(tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "broken"), hooks=StopAt(step=12))  # mid epoch 2
    resume(tmp_path / "broken" / "run")
    straight, resumed = records(tmp_path / "straight" / "run"), records(tmp_path / "broken" / "run")
    assert resumed[1]["train_loss"] == straight[1]["train_loss"] and resumed == straight


def test_a_kill_between_the_metrics_line_and_the_checkpoint_writes_the_epoch_once(tmp_path, monkeypatch):
    train(tiny(tmp_path / "straight"))
    real = RunDir.save_checkpoint
    calls = [0]

    def killed_on_third(self, checkpoint_state):  # 1: start, 2: epoch 1, 3: epoch 2 (after its line)
        calls[0] += 1
        if calls[0] == 3:
            raise SystemExit("killed")
        real(self, checkpoint_state)

    monkeypatch.setattr(RunDir, "save_checkpoint", killed_on_third)
    with pytest.raises(SystemExit):
        train(tiny(tmp_path / "broken"))
    run = tmp_path / "broken" / "run"
    assert [r["epoch"] for r in records(run)] == [1, 2]  # the line landed, its checkpoint did not
    monkeypatch.setattr(RunDir, "save_checkpoint", real)
    resume(run)
    assert_same_run(tmp_path / "straight" / "run", run)


def test_a_torn_log_line_from_a_kill_is_cut_on_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path), hooks=StopAt(step=10))
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 1')  # half a line, as a kill mid-write leaves
    resume(run)
    assert [r["epoch"] for r in records(run)] == [1, 2]


def test_second_ctrl_c_stops_at_once_and_the_last_whole_checkpoint_still_resumes_exactly(tmp_path, monkeypatch):
    train(tiny(tmp_path / "straight"))

    class TwoSignals(StopAt):
        def on_step(self, step, metrics):
            if step == self.step:
                send_sigint()
                send_sigint()  # the user insists: no checkpoint of this step

    with pytest.raises(KeyboardInterrupt) as raised:
        train(tiny(tmp_path / "broken", checkpoint_every=4), hooks=TwoSignals(step=10))
    assert getattr(raised.value, "saved_step", None) is None
    run = tmp_path / "broken" / "run"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["position"]["step"] == 8
    resume(run)
    assert_same_run(tmp_path / "straight" / "run", run)


# -- non-finite values ---------------------------------------------------------------------------------
def nan_batches(monkeypatch, at_index: int, epoch: int, times: int = 10**9):
    """Make batch `at_index` of `epoch` all-NaN (the first `times` times it is drawn)."""
    real, served = datasets.iterate_batches, [0]

    def poisoned(split, batch_size, *, train, generator=None, **kw):
        for i, (x, y) in enumerate(real(split, batch_size, train=train, generator=generator, **kw)):
            if train and i == at_index and poisoned.epoch == epoch and served[0] < times:
                served[0] += 1
                x = torch.full_like(x, float("nan"))
            yield x, y
        poisoned.epoch += train

    poisoned.epoch = 0
    monkeypatch.setattr(datasets, "iterate_batches", poisoned)


def test_nan_stops_with_the_last_finite_checkpoint_kept(tmp_path, monkeypatch):
    nan_batches(monkeypatch, at_index=3, epoch=1)
    with pytest.raises(NonFiniteError) as raised:
        train(tiny(tmp_path, method="sam"))
    assert "non-finite" in str(raised.value) and "step 12 (epoch 2)" in str(raised.value)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["position"]["step"] == 8 and all(torch.isfinite(v.float()).all() for v in saved["model"].values())
    assert not (tmp_path / "run" / "summary.json").exists() and len(records(tmp_path / "run")) == 1


def test_nan_from_a_huge_learning_rate_is_refused_before_it_reaches_a_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError):
        train(tiny(tmp_path, lr=1e6, momentum=0.0, weight_decay=0.0))
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in saved["model"].values())


def test_skip_drops_the_nan_step_and_finishes(tmp_path, monkeypatch):
    nan_batches(monkeypatch, at_index=3, epoch=1)
    summary = train(tiny(tmp_path, on_nonfinite="skip"))
    assert summary["skipped_steps"] == 1 and summary["test_acc"] > 50
    assert records(tmp_path / "run")[-1]["skipped_steps"] == 1


def test_rollback_returns_to_the_checkpoint_with_half_the_learning_rate(tmp_path, monkeypatch):
    nan_batches(monkeypatch, at_index=3, epoch=1, times=1)  # a transient fault
    summary = train(tiny(tmp_path, on_nonfinite="rollback"))
    last = records(tmp_path / "run")[-1]
    assert last["rollbacks"] == 1 and last["lr_scale"] == 0.5 and summary["steps"] == 16
    assert [r["epoch"] for r in records(tmp_path / "run")] == [1, 2]


def test_constant_es_fitness_gives_exactly_zero_shaped_rewards():
    """372 constant inputs: `normalize` gave non-zero values on 103 of them (fp32 mean off by an ulp)."""
    generator = torch.Generator().manual_seed(0)
    for value in torch.randn(186, generator=generator).tolist() + torch.rand(186, generator=generator).mul(1e4).tolist():
        for how in ("normalize", "ranks"):
            assert torch.count_nonzero(shape_rewards(torch.full((16,), value), how)) == 0


# -- leftovers, locks, starts that fail ------------------------------------------------------------------
def test_a_second_resume_of_the_same_run_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path), hooks=StopAt(step=4))
    run = RunDir.open(tmp_path / "run")
    with run.locked():  # another process is training it
        with pytest.raises(UserError, match="being trained by another fastflat process"):
            resume(tmp_path / "run")


def test_resume_clears_temporary_files_that_crashes_left(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, method="sse"), hooks=StopAt(step=9))
    run = tmp_path / "run"
    leftovers = [run / ".checkpoint.pt.k1l2.tmp", run / "members" / ".snapshot-02.pt.x9.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    resume(run)
    assert not any(p.exists() for p in leftovers)


def test_a_start_that_fails_leaves_no_run_directory(tmp_path):
    with pytest.raises(UserError, match="sse.cycles = 40"):
        train(tiny(tmp_path, method="sse", **{"sse.cycles": 40}))
    assert not (tmp_path / "run").exists()


def test_resume_of_an_init_run_does_not_need_the_init_source(tmp_path):
    train(tiny(tmp_path / "source", epochs=1))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "fge", method="fge", init=str(tmp_path / "source" / "run")), hooks=StopAt(step=5))
    (tmp_path / "source" / "run" / "checkpoint.pt").unlink()
    assert resume(tmp_path / "fge" / "run")["steps"] == 16


@pytest.mark.parametrize("undo", ["zero_grad", "to_bf16"])
def test_a_step_on_views_that_left_the_flat_buffer_is_refused(tmp_path, undo):
    from fastflat.loss.closures import BatchClosure
    from fastflat.loop import build_trainer
    from fastflat.loop.steps import train_step

    trainer = build_trainer(tiny(tmp_path), RunDir.create(tmp_path, "t"))
    trainer.model.zero_grad() if undo == "zero_grad" else trainer.model.to(torch.bfloat16)
    x, y = trainer.data.train.images[:8].float(), trainer.data.train.labels[:8]
    with pytest.raises(RuntimeError, match="no longer points into the flat buffer"):
        train_step(trainer.method, trainer.flat, BatchClosure(trainer.model, trainer.flat, x, y), 0.1, 0)


# -- seams for distributed runs --------------------------------------------------------------------------
def test_a_run_directory_of_rank_1_writes_nothing(tmp_path):
    run = RunDir.create(tmp_path, "r", rank=1)
    with run.locked():
        run.write_config({"a": 1})
        run.append_metrics({"step": 1})
        run.save_checkpoint({"x": torch.zeros(1)})
        run.save_member("m", {"w": torch.zeros(1)})
        run.write_summary({"s": 1})
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_every_global_batch_and_together_see_the_single_process_batch(world):
    data = datasets.load_dataset("synthetic")
    data = datasets.Dataset(**{**vars(data), "augment": "crop_flip"})  # randomness must match too

    def batches(rank, world_size):
        g = torch.Generator().manual_seed(3)
        return list(datasets.iterate_batches(data.train, 64, dataset=data, train=True, generator=g,
                                             drop_last=True, rank=rank, world_size=world_size))

    single = batches(0, 1)
    shards = [batches(r, world) for r in range(world)]
    for i, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([s[i][0] for s in shards]), x) and torch.equal(torch.cat([s[i][1] for s in shards]), y)
    with pytest.raises(UserError, match="does not split evenly over 3 processes"):
        next(datasets.iterate_batches(data.train, 64, dataset=data, train=True, rank=0, world_size=3))
