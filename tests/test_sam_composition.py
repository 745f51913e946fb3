"""Every SAM variant and ascent schedule composed with what SAM composes with. No combination is refused:

    | with                          | checked here                                                          |
    | --amp fp16                    | a power-of-two loss scale gives the unscaled steps; an overflowed      |
    |                               | gradient skips its step, halves the scale, leaves all state finite     |
    | --accumulate 2                | two micro-batches of 16 step as the batch of 32                        |
    | torchrun (2 processes)        | trains, ranks bitwise equal at every checkpoint (one launch for all)   |
    | --clip-grad, --optimizer adamw, --swa | together in one run: trains, SWA averages                      |
    | Ctrl-C mid-step, resume       | the resumed run equals the straight one bit for bit (those with state) |
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastflat.config import load_config
from fastflat.flat import flatten
from fastflat.loop import resume, train
from fastflat.loss import closures
from fastflat.loss.closures import BatchClosure, SplitClosure
from fastflat.methods import build_method
from helpers import send_sigint
from test_amp import OverflowOnce
from test_faults import assert_same_run

FAMILY = {  # the variants and schedules, each as --method sam settings
    "gsam": {"sam.variant": "gsam"}, "fsam": {"sam.variant": "fsam"}, "wsam": {"sam.variant": "wsam"},
    "wsam-coupled": {"sam.variant": "wsam", "sam.wsam_decouple": False},
    "msam": {"sam.variant": "msam"}, "esam": {"sam.variant": "esam"},
    "looksam": {"sam.variant": "looksam", "sam.looksam_k": 2}, "sam-on": {"sam.only": "norm"},
    "every": {"sam.every": 2}, "prob": {"sam.prob": 0.5}, "from": {"sam.start": 0.5},
    "esam-on-every": {"sam.variant": "esam", "sam.only": "norm", "sam.every": 2},
}
WORKER = Path(__file__).parent / "workers" / "train_mlp.py"


class Services:
    def __init__(self, scaler=None):
        self.scaler, self.resuming, self.steps_per_epoch, self.total_steps = scaler, False, 2, 4


def mlp(norm=nn.BatchNorm1d):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), norm(32), nn.ReLU(), nn.Linear(32, 10))


def batches(n=4, size=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def setup(variant, scale=None, norm=nn.BatchNorm1d):
    cfg = load_config(overrides={"method": "sam", "momentum": 0.9, "weight_decay": 5e-4, **FAMILY[variant]})
    model = mlp(norm)
    flat = flatten(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale is not None else None
    method = build_method(cfg)
    method.init(flat, Services(scaler))
    return model, flat, method, scaler


def test_the_torchrun_worker_trains_the_same_family():
    spec = importlib.util.spec_from_file_location("train_mlp", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    assert {k for k in FAMILY if k not in ("wsam-coupled", "esam-on-every")} == set(worker.SAM_FAMILY)


@pytest.mark.parametrize("variant", sorted(FAMILY))
def test_a_power_of_two_loss_scale_gives_the_unscaled_steps(variant):
    results = []
    for scale in (None, 2.0**12):
        model, flat, method, scaler = setup(variant, scale)
        for x, y in batches():
            method.step(flat, BatchClosure(model, flat, x, y, "none", scaler), lr=0.1)
        results.append(flat.params[0].clone())
    if variant == "looksam":  # its ratio |g|/(|g_v| + 1e-8) weighs the 1e-8 differently on scaled gradients
        torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("variant", sorted(FAMILY))
def test_an_overflowed_gradient_skips_the_step_and_keeps_every_state_finite(variant):
    model, flat, method, scaler = setup(variant, 2.0**12)
    (x, y), (x2, y2), (x3, y3) = batches(3)
    for xb, yb in ((x2, y2), (x3, y3)):  # momentum, F-SAM's m and LookSAM's g_v exist
        method.step(flat, BatchClosure(model, flat, xb, yb, "none", scaler), lr=0.1)
    weights = flat.params[0].clone()
    metrics = method.step(flat, OverflowOnce(BatchClosure(model, flat, x, y, "none", scaler), flat), lr=0.1)
    assert metrics["overflow"] and torch.equal(flat.params[0], weights)
    assert scaler.get_scale() == 2.0**11
    kept = [t for v in method.state_dict().values() if isinstance(v, list) for t in v if isinstance(t, torch.Tensor)]
    assert all(bool(torch.isfinite(t).all()) for t in kept)
    assert "overflow" not in method.step(flat, BatchClosure(model, flat, x, y, "none", scaler), lr=0.1)


@pytest.mark.parametrize("variant", sorted(FAMILY))
def test_two_accumulated_micro_batches_step_as_their_doubled_batch(variant):
    runs = []
    for split in (False, True):
        model, flat, method, _ = setup(variant, norm=nn.LayerNorm)  # per-example normalization: no ghost batches
        for x, y in batches():
            chunks = [(x[:16], y[:16]), (x[16:], y[16:])]
            closure = SplitClosure(model, flat, chunks) if split else BatchClosure(model, flat, x, y)
            method.step(flat, closure, lr=0.1)
        runs.append(flat.params[0].clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_every_variant_trains_on_two_ranks_with_their_weights_bitwise_equal(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
               str(tmp_path), "two", "sam-family", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]  # a rank whose weights differ fails its checkpoint
    for variant in (k for k in FAMILY if k not in ("wsam-coupled", "esam-on-every")):
        summary = json.loads((tmp_path / f"two-{variant}" / "summary.json").read_text())
        assert summary["ranks"] == 2 and summary["test_acc"] > 30, variant  # 4 classes: chance is 25%


TINY = {"dataset": "synthetic", "subset": 128, "batch_size": 32, "epochs": 2, "seed": 5}


@pytest.mark.parametrize("variant", sorted(FAMILY))
def test_clipping_adamw_and_swa_compose_with_each(variant, tmp_path):
    summary = train(load_config(overrides={**TINY, "method": "sam", **FAMILY[variant], "optimizer": "adamw", "lr": 0.01,
                                           "clip_grad": 0.5, "swa.enabled": True, "swa.start": 0.5, "swa.cycle": 1,
                                           "out": str(tmp_path), "name": "r"}))
    assert summary["swa_models_averaged"] >= 2 and summary["swa_acc"] is not None


@pytest.fixture
def sigint_at_passes(monkeypatch):
    """Ctrl-C during the forward passes numbered in the returned set (counted across resumes)."""
    calls, at = [0], set()
    real = closures._forward

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] in at:
            send_sigint()
        return real(*args, **kwargs)

    monkeypatch.setattr(closures, "_forward", interrupted)
    return at, calls


# those with state across steps or draws by the step (the others keep only the step count, which these cover)
STATEFUL = ["esam-on-every", "from", "fsam", "looksam", "msam", "prob", "wsam"]


@pytest.mark.parametrize("variant", STATEFUL)
def test_ctrl_c_mid_step_resumes_bit_for_bit(variant, tmp_path, sigint_at_passes):
    at, calls = sigint_at_passes
    settings = {**TINY, "method": "sam", **FAMILY[variant], "eval_every": 1}
    train(load_config(overrides={**settings, "out": str(tmp_path / "straight"), "name": "run"}))
    calls[0] = 0
    at.update({3, 7})  # inside steps 2-3 and 4-7 (8 steps; one or two passes each): a stop before and after a resume
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides={**settings, "out": str(tmp_path / "broken"), "name": "run"}))
    with pytest.raises(KeyboardInterrupt):
        resume(tmp_path / "broken" / "run")
    resume(tmp_path / "broken" / "run")
    assert_same_run(tmp_path / "straight" / "run", tmp_path / "broken" / "run")
