"""torchrun with two gloo processes on the CPU (hard timeouts): the ranks' weights stay bitwise equal
(checked at every checkpoint, or the run fails), a 2-rank run equals the 1-process run with the same
global batch, a run saved on 2 ranks continues on 1, and `fastflat train --nproc 2` launches torchrun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastflat.cli import main

WORKER = str(Path(__file__).parent / "workers" / "train_mlp.py")


def torchrun(*args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def alone(*args):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def weights(run):
    return torch.load(Path(run) / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("method", ["sgd", "sam", "swa", "fge", "ema", "lawa", "sf"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, method):
    torchrun(WORKER, str(tmp_path), "two", method, "2")
    # SAM's ascent stays per rank (m = the per-rank batch, as the SAM paper's distributed setup), so its
    # one-process twin is m-sharpness with m = 32, the per-rank share of the global batch of 64
    alone(WORKER, str(tmp_path), "one", "sam-m32" if method == "sam" else method, "2")
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    for key in one:  # mean of two half-batch gradients vs one batch: equal up to float rounding
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["test_acc"] == pytest.approx(
        json.loads((tmp_path / "one" / "summary.json").read_text())["test_acc"], abs=1.0)
    if method in ("ema", "lawa"):  # the average too (checkpoints also check it is bitwise one across ranks)
        two, one = (torch.load(tmp_path / run / "members" / f"{method}.pt", weights_only=True) for run in ("two", "one"))
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["fullbatch", "fullbatch-finite", "fullbatch-exact"])
def test_full_batch_on_two_ranks_equals_one_process_with_and_without_the_penalty(tmp_path, method):
    """Each rank holds half the set; the whole-set penalty perturbs along the all-reduced g."""
    torchrun(WORKER, str(tmp_path), "two", method, "6")
    alone(WORKER, str(tmp_path), "one", method, "6")
    for key, value in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[key], value, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["steps"] == 6


def test_a_curve_trained_on_two_ranks_equals_one_process(tmp_path):
    """The same t each step on every rank (one seeded generator), the bend's gradient all-reduced."""
    alone(WORKER, str(tmp_path), "end-a", "sgd", "1")
    alone(WORKER, str(tmp_path), "end-b", "sgd", "3")
    torchrun(WORKER, str(tmp_path), "two", "curve", "2")
    alone(WORKER, str(tmp_path), "one", "curve", "2")
    for tag in ("start", "bend", "end"):
        one = torch.load(tmp_path / "one" / "members" / f"{tag}.pt", weights_only=True)
        two = torch.load(tmp_path / "two" / "members" / f"{tag}.pt", weights_only=True)
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["curve_kind"] == "bezier"


def test_ctrl_c_under_torchrun_checkpoints_one_agreed_step_and_resumes_bitwise(tmp_path):
    """SIGINT to the whole group (torchrun forwards a second one to the ranks): every rank stops after
    the same step, rank 0 writes one checkpoint, and the resumed run ends where the whole one does."""
    torchrun(WORKER, str(tmp_path), "whole", "sam", "3")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               WORKER, str(tmp_path), "cut", "sam", "3", "sigint@13"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, start_new_session=True)
    assert done.returncode != 0 and not (tmp_path / "cut" / "summary.json").exists()
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["position"]["step"]
    assert 0 < saved < 24  # stopped mid-run (at step 13, or the checkpoint before a second signal)
    torchrun(WORKER, str(tmp_path), "cut", "sam", "3", "resume")
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert (tmp_path / "cut" / "metrics.jsonl").read_text().count("\n") == 3


def test_fp16_sam_on_two_ranks_keeps_the_ranks_equal_and_matches_one_process(tmp_path):
    """The loss scale is the same on every rank (an overflow anywhere is an inf in the all-reduced
    gradient everywhere); weights are checked bitwise equal across ranks at every checkpoint."""
    torchrun(WORKER, str(tmp_path), "two", "sam-fp16", "2")
    alone(WORKER, str(tmp_path), "one", "sam-m32-fp16", "2")
    for key, value in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[key], value, rtol=1e-3, atol=1e-3)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["ranks"] == 2 and two["loss_scale"] == json.loads((tmp_path / "one" / "summary.json").read_text())["loss_scale"]


def test_a_rank_killed_mid_run_stops_the_job_and_the_last_checkpoint_resumes_bitwise(tmp_path):
    torchrun(WORKER, str(tmp_path), "whole", "sgd", "3")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               WORKER, str(tmp_path), "cut", "sgd", "3", "sigkill@13"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0 and not (tmp_path / "cut" / "summary.json").exists()
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["position"]["step"]
    assert saved == 8  # the end of epoch 1 (8 steps an epoch): rank 0 wrote nothing after rank 1 died
    assert not list((tmp_path / "cut").glob(".*.tmp"))  # no half-written file (rundir.TEMPORARY)
    torchrun(WORKER, str(tmp_path), "cut", "sgd", "3", "resume")
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_sam_sync_ascent_on_two_ranks_equals_plain_sam_in_one_process(tmp_path):
    torchrun(WORKER, str(tmp_path), "two", "sam-sync", "2")
    alone(WORKER, str(tmp_path), "one", "sam", "2")
    for key, value in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_accumulating_two_batches_equals_the_doubled_batch(tmp_path, method):
    alone(WORKER, str(tmp_path), "acc", f"{method}-acc2", "2")  # SAM ascends with both halves' gradient
    alone(WORKER, str(tmp_path), "big", method, "2")
    for key, value in weights(tmp_path / "big").items():
        torch.testing.assert_close(weights(tmp_path / "acc")[key], value, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "acc" / "summary.json").read_text())["steps"] == 16


def test_sync_bn_makes_two_ranks_train_the_cnn_as_one_process(tmp_path):
    common = ["train", "--dataset", "synthetic", "--epochs", "1", "--device", "cpu", "--log-every", "0",
              "--out", str(tmp_path), "--model", "cnn", "--lr", "0.05", "--no-nesterov"]  # the recipe measured below
    assert main([*common, "--nproc", "2", "--sync-bn", "--name", "two"]) == 0
    assert main([*common, "--name", "one"]) == 0
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert two.keys() == one.keys()  # the checkpoint loads into a plain model
    # BatchNorm statistics over both ranks' 64 examples: the one-process batch of 128, up to float rounding,
    # which 8 steps amplify differently on different CPUs (oneDNN kernels). Measured on this machine, the
    # worst tensor's relative difference: 0.003 with --sync-bn, 0.40 without it (per-rank statistics).
    for key in one:
        if one[key].is_floating_point():
            difference = (two[key].float() - one[key].float()).norm() / one[key].float().norm().clamp(min=1e-12)
            assert difference < 1e-2, key
        else:
            assert torch.equal(two[key], one[key]), key  # num_batches_tracked


def test_es_on_two_ranks_splits_the_children_and_updates_bitwise_as_one_process(tmp_path):
    common = ["train", "--method", "es", "--dataset", "synthetic", "--epochs", "1", "--max-steps", "3",
              "--children", "16", "--chunk", "4", "--device", "cpu", "--out", str(tmp_path),
              # NCHW: oneDNN's grouped convolution (vmapped children) in NHWC rounds a child's fitness differently
              # with other children beside it, so a channels_last model agrees across rank counts only to rounding
              "--memory-format", "contiguous"]
    assert main([*common, "--nproc", "2", "--name", "two"]) == 0
    assert main([*common, "--name", "one"]) == 0
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert all(torch.equal(two[k], one[k]) for k in one)  # only (member, fitness) crossed ranks


def test_spartan_runs_across_ranks_with_its_mutation_rounds(tmp_path):
    assert main(["train", "--nproc", "2", "--method", "spartan", "--dataset", "synthetic", "--epochs", "1",
                 "--children", "8", "--device", "cpu", "--out", str(tmp_path), "--name", "sp"]) == 0
    rounds = (tmp_path / "sp" / "evolution.jsonl").read_text().splitlines()
    assert len(rounds) == 1 and json.loads((tmp_path / "sp" / "summary.json").read_text())["ranks"] == 2


def test_a_run_saved_on_two_ranks_continues_on_one(tmp_path):
    torchrun(WORKER, str(tmp_path), "split", "sgd", "1")
    alone(WORKER, str(tmp_path), "split", "sgd", "1", "2")  # extend the 2-rank run, in one process
    alone(WORKER, str(tmp_path), "whole", "sgd", "2")
    for key, value in weights(tmp_path / "whole").items():
        torch.testing.assert_close(weights(tmp_path / "split")[key], value, rtol=1e-4, atol=1e-5)


def test_nproc_launches_torchrun_and_rank_0_alone_writes(tmp_path, capfd):
    code = main(["train", "--nproc", "2", "--dataset", "synthetic", "--epochs", "1", "--method", "sam",
                 "--device", "cpu", "--out", str(tmp_path), "--name", "r"])
    out = capfd.readouterr().out
    assert code == 0 and json.loads((tmp_path / "r" / "summary.json").read_text())["ranks"] == 2
    assert out.count("run directory") == 1 and [p.name for p in tmp_path.iterdir()] == ["r"]


@pytest.mark.parametrize("args, message", [
    (["--nproc", "999"], "this machine has"),
    (["--nproc", "2", "--batch-size", "127"], "does not split over 2 processes"),
    (["--nproc", "2", "--method", "fullbatch", "--subset", "1023", "--chunk-size", "512"], "divisible by 2: use --subset 1022"),
])
def test_distributed_bad_input_is_one_line(tmp_path, capfd, args, message):
    code = main(["train", *args, "--dataset", "synthetic", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path)])
    err = capfd.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1]  # the last line names the problem
    assert "[rank" not in err  # no rank's traceback (rank 1 once died in its error handler)


def test_bench_train_times_steps_on_two_processes(tmp_path, capfd):
    code = main(["bench", "train", "--model", "cnn", "--methods", "sgd,sam,ddp-sgd,ddp-sam", "--steps", "2",
                 "--warmup", "0", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path), "--nproc", "2"])
    capfd.readouterr()
    (path,) = tmp_path.glob("*.json")
    rows = json.loads(path.read_text())["rows"]
    assert code == 0 and [r["processes"] for r in rows] == [2] * 4 and all(r["status"] == "ok" for r in rows)
    assert rows[0]["samples_per_s"] == pytest.approx(16 * rows[0]["steps_per_s"])  # the global batch
    assert [r["passes_per_step"] for r in rows] == [1, 2, 1, 2] and rows[2]["ratio_to_sgd"] > 0  # stock DDP beside ours


@pytest.mark.parametrize("mode", ["plain", "flat"])
def test_the_sam_dropin_in_your_own_ddp_loop_keeps_ranks_equal_and_is_per_rank_m_sharpness(tmp_path, mode):
    """The docs/library.md recipe (tests/workers/sam_ddp_loop.py): ascent inside no_sync(), DDP's descent."""
    loop = str(Path(__file__).parent / "workers" / "sam_ddp_loop.py")
    torchrun(loop, str(tmp_path), mode)
    alone(loop, str(tmp_path), "reference")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    expected = torch.load(tmp_path / "reference.pt")
    for a, b, e in zip(*ranks, expected):
        assert torch.equal(a, b)  # DDP averaged the same gradient into both ranks
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_the_sam_variant_dropins_in_your_own_ddp_loop_keep_the_ranks_equal(tmp_path):
    """FriendlySAM, LookSAM and WSAM in the same recipe (tests/workers/sam_ddp_loop.py, mode family)."""
    loop = str(Path(__file__).parent / "workers" / "sam_ddp_loop.py")
    torchrun(loop, str(tmp_path), "family")
    for name in ("FriendlySAM", "LookSAM", "WSAM"):
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1)]
        for a, b in zip(*ranks):
            assert torch.equal(a, b), name
