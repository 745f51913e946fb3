"""`fastflat bench`: rows with every field in JSON and CSV, providers checked against flat-torch before
they are timed (a wrong one is flagged, not timed), results never overwritten, real parameter shapes."""

import csv
import json
from dataclasses import replace

import pytest
import torch

from fastflat.bench import registry
from fastflat.bench.kernels import ROW_FIELDS, TOLERANCE
from fastflat.bench.report import write_results
from fastflat.bench.train import TRAIN_FIELDS
from fastflat.bench.workloads import DTYPES, gpt2_small_shapes, model_shapes
from fastflat.cli import main

PROVENANCE = ("device_kind", "device", "torch", "triton", "git_sha", "timestamp")
QUICK = ["--quick", "--sizes", "2^10", "--models", "cnn", "--dtypes", "fp32,bf16", "--providers", ",".join(registry.PROVIDERS)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Smoke timings only need to exist; OpenMP threads on a shared 2-core runner make each op ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_results(folder):
    (json_path,), (csv_path,) = list(folder.glob("*.json")), list(folder.glob("*.csv"))
    with open(csv_path, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    return json.loads(json_path.read_text())["rows"], csv_rows


@pytest.fixture(scope="module")
def kernel_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    assert main(["bench", "kernels", *QUICK, "--out", str(out)]) == 0
    return read_results(out)


def test_kernel_rows_carry_every_field_in_json_and_csv(kernel_rows):
    rows, csv_rows = kernel_rows
    ops, providers = len(registry.OPS), len(registry.PROVIDERS)
    assert len(rows) == 2 * 2 * (1 + ops * providers)  # (2^10, cnn) x (fp32, bf16) x (copy + ops x providers)
    for row in rows:
        assert set(ROW_FIELDS + PROVENANCE) <= set(row)
        assert row["timestamp"] == rows[0]["timestamp"] and row["torch"] == torch.__version__
    assert list(csv_rows[0]) == list(rows[0]) and len(csv_rows) == len(rows)


def test_every_op_runs_on_a_flat_vector_and_on_a_real_parameter_list(kernel_rows):
    rows, _ = kernel_rows
    cases = {(r["op"], r["workload"], r["numel"]) for r in rows if r["provider"] == "flat-torch"}
    cnn_params = sum(torch.Size(s).numel() for s in model_shapes("cnn"))
    assert cases == {(op, w, n) for op in registry.OPS for w, n in (("2^10", 1024), ("cnn", cnn_params))}
    loop_on_cnn = [r for r in rows if r["provider"] == "loop" and r["workload"] == "cnn"]
    assert loop_on_cnn and all(r["tensors"] == len(model_shapes("cnn")) for r in loop_on_cnn)


def test_loop_and_foreach_compute_what_flat_torch_computes(kernel_rows):
    rows, _ = kernel_rows
    baselines = [r for r in rows if r["provider"] in ("loop", "foreach")
                 and getattr(registry.OPS[r["op"]], r["provider"]) is not None]
    assert {r["op"] for r in baselines} >= {"sqnorm", "clip", "sam", "sam+sgd", "average"}
    for r in baselines:
        assert r["status"] == "ok", r
        assert r["max_rel_err"] <= TOLERANCE[DTYPES[r["dtype"]]]


def test_timed_rows_report_bandwidth_at_the_floor_and_speedups(kernel_rows):
    rows, _ = kernel_rows
    timed = {(r["op"], r["workload"], r["dtype"], r["provider"]): r for r in rows if r["status"] == "ok"}
    row = timed[("sam", "cnn", "bf16", "flat-torch")]
    assert row["floor_bytes"] == 7 * row["numel"] * 2  # 7 bf16 elements moved per parameter
    assert row["gbps"] == pytest.approx(row["floor_bytes"] / (row["time_ms"] * 1e-3) / 1e9)
    assert row["pct_copy"] == pytest.approx(100 * row["gbps"] / row["copy_gbps"])
    assert row["vs_loop"] == pytest.approx(timed[("sam", "cnn", "bf16", "loop")]["time_ms"] / row["time_ms"])
    assert row["iqr_ms"] >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_on_cpu_triton_is_not_applicable_and_quick_skips_compile(kernel_rows):
    rows, _ = kernel_rows
    for provider, status in (("triton", "n/a"), ("compile", "skipped")):
        chosen = [r for r in rows if r["provider"] == provider]
        assert chosen and all(r["status"] == status and r["time_ms"] is None and r["reason"] for r in chosen)


def _bench_one_op(tmp_path, op):
    code = main(["bench", "kernels", "--quick", "--sizes", "2^10", "--models", "none", "--dtypes", "fp32",
                 "--ops", op, "--providers", "loop,flat-torch", "--out", str(tmp_path)])
    assert code == 0
    return {r["provider"]: r for r in read_results(tmp_path)[0] if r["op"] == op}


def test_a_provider_with_a_wrong_result_is_flagged_invalid_and_not_timed(monkeypatch, tmp_path):
    right = registry.OPS["sqnorm"]

    def doubled(bufs):
        impl = right.loop(bufs)
        return registry.Impl(impl.steps, lambda: [2 * t for t in impl.result()])

    monkeypatch.setitem(registry.OPS, "sqnorm", replace(right, loop=doubled))
    rows = _bench_one_op(tmp_path, "sqnorm")
    assert rows["loop"]["status"] == "invalid" and rows["loop"]["time_ms"] is None
    assert rows["loop"]["max_rel_err"] == pytest.approx(1.0) and "flat-torch" in rows["loop"]["reason"]
    assert rows["flat-torch"]["status"] == "ok"


def test_a_sam_that_forgets_to_restore_is_flagged_at_that_step(monkeypatch, tmp_path):
    right = registry.OPS["sam"]

    def no_restore(bufs):
        impl = right.loop(bufs)
        return registry.Impl([impl.steps[0], lambda: None], impl.result)

    monkeypatch.setitem(registry.OPS, "sam", replace(right, loop=no_restore))
    assert _bench_one_op(tmp_path, "sam")["loop"]["status"] == "invalid"


def test_results_are_never_overwritten(tmp_path):
    device = torch.device("cpu")
    first = write_results(tmp_path, "kernels", device, [{"op": "copy"}], {}, stamp="20260101T000000Z")
    second = write_results(tmp_path, "kernels", device, [{"op": "sam"}], {}, stamp="20260101T000000Z")
    assert first != second and all(p.exists() for p in (*first, *second))
    assert json.loads(first[0].read_text())["rows"] == [{"op": "copy"}]


def test_model_workloads_have_the_real_parameter_shapes():
    def count(shapes):
        return len(shapes), sum(torch.Size(s).numel() for s in shapes)

    assert count(model_shapes("resnet18")) == (62, 11_173_962)  # torchvision's, CIFAR stem, 10 classes
    assert 36.4e6 < count(model_shapes("wrn-28-10"))[1] < 36.6e6  # 36.5M (Zagoruyko & Komodakis 2016)
    assert count(gpt2_small_shapes()) == (148, 124_439_808)


def test_a_bad_size_is_one_line_and_exit_code_2(capsys, tmp_path):
    code = main(["bench", "kernels", "--sizes", "2^x", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --sizes") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_train_reports_rates_passes_and_sam_over_sgd(tmp_path):
    code = main(["bench", "train", "--model", "cnn", "--methods", "sgd,sam,swa,no-such,ddp-sgd", "--steps", "2",
                 "--warmup", "0", "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path)])
    rows, csv_rows = read_results(tmp_path)
    sgd, sam, swa, missing, ddp = rows
    assert code == 0 and len(csv_rows) == 5
    assert ddp["status"] == "unavailable" and "--nproc 2" in ddp["reason"]  # stock DDP needs a process group
    assert all(set(TRAIN_FIELDS + PROVENANCE) <= set(r) for r in rows)
    assert (sgd["passes_per_step"], sam["passes_per_step"]) == (1, 2)
    assert sgd["ratio_to_sgd"] == 1.0 and sam["ratio_to_sgd"] == pytest.approx(sam["step_ms"] / sgd["step_ms"])
    assert sam["samples_per_s"] == pytest.approx(8 * sam["steps_per_s"]) and sam["steps_per_s"] > 0
    assert sam["outside_fwd_bwd_ms"] == pytest.approx(sam["step_ms"] - 2 * sam["fwd_bwd_ms"])
    assert swa["status"] == "ok" and swa["passes_per_step"] == 1 and swa["round_ms"] is None
    assert missing["status"] == "unavailable" and missing["step_ms"] is None and "not a fastflat method" in missing["reason"]


def test_train_bench_times_the_averages_over_sgd(tmp_path):
    code = main(["bench", "train", "--quick", "--methods", "sgd,ema,lawa", "--steps", "2", "--warmup", "1",
                 "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path)])
    rows, _ = read_results(tmp_path)
    assert code == 0 and [r["method"] for r in rows] == ["sgd", "ema", "lawa"]
    assert all(r["status"] == "ok" and r["passes_per_step"] == 1 and r["ratio_to_sgd"] > 0 for r in rows)


def test_es_memory_writes_one_row_per_k(tmp_path, capsys):
    from fastflat.cli import main

    assert main(["bench", "es-memory", "--children", "2,6", "--size", "2^12", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("es-memory-*.json")).read_text())["rows"]
    assert [r["children"] for r in rows] == [2, 6]
    assert all(r["peak_extra_bytes"] >= 0 and r["stored_noise_bytes"] == r["children"] * 2**12 * 4 and r["git_sha"] is not None
               for r in rows)


def test_gpu_check_script_runs_end_to_end_in_cpu_smoke_mode(tmp_path):
    """scripts/gpu_check.sh is what a borrowed GPU's few minutes go to: it must not rot untested."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS_ROOT": str(tmp_path / "results"), "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-smoke"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (results,) = (tmp_path / "results").iterdir()
    status = (results / "status.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in status] == ["tests", "bench-kernels", "bench-train", "bench-es-memory", "bench-landscape"]
    assert all(": exit 0 " in line for line in status), status
    assert "device: cpu" in (results / "provenance.txt").read_text()
    assert len(list(results.glob("*.json"))) == 4  # kernels, train, es-memory, landscape
    with tarfile.open(next(tmp_path.glob("*.tar.gz"))) as packed:
        assert f"{results.name}/status.txt" in packed.getnames()


def test_train_full_batch_rows_compare_with_an_sgd_epoch_over_the_same_data(tmp_path):
    from fastflat.bench.train import FULL_BATCHES

    code = main(["bench", "train", "--model", "cnn", "--methods", "sgd,fullbatch,fullbatch-finite,fullbatch-exact",
                 "--steps", "2", "--warmup", "0", "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path)])
    rows, _ = read_results(tmp_path)
    sgd, plain, finite, exact = rows
    assert code == 0 and all(r["status"] == "ok" for r in rows)
    assert [r["batches_per_step"] for r in rows] == [1, FULL_BATCHES, FULL_BATCHES, FULL_BATCHES]
    assert (plain["passes_per_step"], finite["passes_per_step"]) == (FULL_BATCHES, 2 * FULL_BATCHES)
    for r in (plain, finite, exact):  # per batch of data: against an SGD epoch over the same batches
        assert r["ratio_to_sgd"] == pytest.approx(r["step_ms"] / (FULL_BATCHES * sgd["step_ms"]))
        assert r["samples_per_s"] == pytest.approx(FULL_BATCHES * 8 * r["steps_per_s"])


def test_hessian_bench_compares_lanczos_with_pyhessian_at_equal_data(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["bench", "hessian", "--dataset", "synthetic", "--examples", "256", "--repeats", "2", "--seeds", "0,1",
                     "--device", "cpu", "--out", str(tmp_path)])
    assert not [w for w in caught if "create_graph" in str(w.message)]  # PyHessian's backward made torch warn
    rows, _ = read_results(tmp_path)
    r = rows[0]
    assert code == 0 and r["hvp_over_grad"] == pytest.approx(r["hvp_ms"] / r["grad_ms"]) and r["hvp_kept_ms"] > 0
    assert {row["solver"] for row in rows} == {"lanczos, random start (fastflat)", "power iteration, PyHessian's rule",
                                               "lanczos, subsample start (fastflat sharpness)", "PyHessian 0.1"}
    assert len(rows) == 8 and all(row["status"] == "ok" and row["git_sha"] and row["examples"] == 256 for row in rows)
    for row in rows:  # all four find the same top eigenvalue, PyHessian's own code included
        assert row["rel_error"] < 0.05 and row["full_hvps"] >= 2 and row["seconds"] > 0
        if row["solver"].startswith("lanczos, subsample"):  # every 8th example: 32 of 256, each product 1/8 of one
            assert row["start_examples"] == 32 and row["start_hvps"] >= 1
            assert row["hvps"] == pytest.approx(row["full_hvps"] + row["start_hvps"] / 8)
        else:
            assert row["start_hvps"] == 0 and row["hvps"] == row["full_hvps"]


def test_hessian_bench_summary_compares_each_solver_with_pyhessian():
    from fastflat.bench.hessian import summarise

    row = lambda solver, hvps, error, status="ok": {"solver": solver, "hvps": hvps, "rel_error": error,  # noqa: E731
                                                   "seconds": 1.0, "status": status}
    rows = [row("PyHessian 0.1", 6, 1e-3), row("PyHessian 0.1", 10, 3e-3), row("lanczos", 3.5, 1e-4),
            row("lanczos", 4.5, 2e-4), row("power iteration, PyHessian's rule", None, None, "unavailable")]
    means = {m["solver"]: m for m in summarise(rows)}
    assert set(means) == {"PyHessian 0.1", "lanczos"}  # a solver that did not run has no mean
    assert means["lanczos"]["mean_hvps"] == 4.0 and means["lanczos"]["hvps_over_baseline"] == 0.5
    assert means["PyHessian 0.1"]["median_rel_error"] == pytest.approx(2e-3) and means["lanczos"]["max_rel_error"] == 2e-4
    without = {m["solver"]: m for m in summarise([row("lanczos", 4, 1e-4), row("power iteration, PyHessian's rule", 8, 1e-3)])}
    assert without["lanczos"]["hvps_over_baseline"] == 0.5  # no PyHessian: its rule on our operator is the baseline


def test_landscape_bench_scores_the_same_grid_every_way_and_agrees_with_the_loop(tmp_path):
    code = main(["bench", "landscape", "--dataset", "synthetic", "--examples", "128", "--grid", "2",
                 "--at-once", "3", "--device", "cpu", "--out", str(tmp_path)])
    rows, _ = read_results(tmp_path)
    assert code == 0 and [r["variant"].split(",")[-1].strip() for r in rows][1:] == ["one point at a time", "3 points at once (vmap)"]
    assert all(r["points"] == 4 and r["max_train_loss_diff_vs_loop"] < 1e-4 and r["git_sha"] for r in rows)
    assert rows[0]["speedup_vs_loop"] == 1.0


def test_noise_warnings_flag_what_was_seen_under_load():
    from fastflat.bench.report import noise_warnings

    rows = [{"op": "sam_perturb", "provider": "triton", "status": "ok", "time_ms": 1.0, "iqr_ms": 0.1, "pct_copy": 2525.7},
            {"op": "copy", "provider": "torch", "status": "ok", "time_ms": 1.0, "iqr_ms": 0.6, "gbps": 0.3},
            {"method": "sam", "model": "cnn", "status": "ok", "step_ms": 50.0, "iqr_ms": 1.0, "outside_fwd_bwd_ms": -94.77},
            {"method": "sgd", "model": "cnn", "status": "ok", "step_ms": 50.0, "iqr_ms": 1.0, "outside_fwd_bwd_ms": 3.0}]
    lines = noise_warnings(rows)
    assert any("2526% of copy bandwidth" in line for line in lines)
    assert any("IQR" in line and "copy" in line for line in lines) and any("0.30 GB/s" in line for line in lines)
    assert any("negative time outside fwd+bwd" in line and "sam cnn (-94.8 ms" in line for line in lines)
    assert rows[3]["warnings"] == "" and len(lines) == 4
    # one line per kind of doubt, however many cases share it (a quick run once printed 26 copies)
    many = [{"op": "sqnorm", "workload": f"2^{k}", "provider": "loop", "status": "ok", "time_ms": 1.0, "iqr_ms": 0.1,
             "pct_copy": 900.0} for k in range(10)]
    assert len(noise_warnings(many)) == 1 and all("900%" in r["warnings"] for r in many)


def test_bench_format_json_prints_every_row_unrounded(tmp_path, capsys):
    code = main(["bench", "train", "--model", "cnn", "--methods", "sgd", "--steps", "2", "--warmup", "0",
                 "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path), "--format", "json"])
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert code == 0 and rows[0]["method"] == "sgd" and isinstance(rows[0]["step_ms"], float) and "warnings" in rows[0]
    assert main(["bench", "train", "--format", "xml"]) == 2


@pytest.mark.parametrize("quick", [False, True])
def test_kernel_bench_defaults_on_a_cpu_skip_compile_and_bf16(monkeypatch, tmp_path, quick):
    from fastflat.bench import kernels as kernel_bench

    seen = {}
    monkeypatch.setattr(kernel_bench, "run_kernels", lambda settings, on_workload: seen.setdefault("s", settings) and [])
    main(["bench", "kernels", "--device", "cpu", "--out", str(tmp_path), *(["--quick"] if quick else [])])
    settings = seen["s"]
    assert settings.dtypes == ["fp32"] and "compile" not in settings.providers
    assert [w.label for w in settings.workloads] == (["2^16", "2^20"] if quick else ["2^16", "2^20", "2^22", "cnn"])


def test_recipe_bench_times_every_contender_and_the_plain_loop_trains_the_same_recipe(tmp_path, capsys):
    from fastflat.bench.recipe import CONTENDERS, summarize
    from fastflat.cli import main

    args = ["bench", "recipe", "--dataset", "synthetic", "--seeds", "0,1", "--max-steps", "6", "--out", str(tmp_path)]
    assert main(args) == 0
    document = json.loads(next(tmp_path.glob("recipe-*.json")).read_text())
    rows = document["rows"]
    assert {(r["contender"], r["seed"]) for r in rows if r["final"]} == {(c, s) for c in CONTENDERS for s in (0, 1)}
    assert all(r["seconds"] > 0 and 0 <= r["test_acc"] <= 100 and r["git_sha"] is not None for r in rows)
    summary = {r["contender"]: r for r in summarize(rows)}
    assert summary["old-sam"]["x_baseline"] == pytest.approx(1.0)
    # the plain PyTorch loop trains what `sgd` trains (same batches, schedule, smoothing): only rounding differs
    for seed in (0, 1):
        final = {r["contender"]: r["test_acc"] for r in rows if r["final"] and r["seed"] == seed}
        assert abs(final["plain-sgd"] - final["sgd"]) <= 1.0, final
    assert next(tmp_path.glob("recipe-*.png")).stat().st_size > 0
    out = capsys.readouterr().out
    assert "fastflat train --method sam --model cnn" in out
    assert all(f"{c}, seed 1: epoch 1," in out for c in CONTENDERS)  # a line per epoch of every run: never silent


def test_recipe_bench_refuses_an_unknown_contender_in_one_line(tmp_path, capsys):
    from fastflat.cli import main

    code = main(["bench", "recipe", "--contenders", "sgd,adamw", "--dataset", "synthetic", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--contenders: unknown 'adamw'" in err and err.count("\n") == 1


def test_hessian_bench_reports_progress_through_every_stage():
    """Its default ran over 3 minutes without a line: every stage now reports, and the solver stage
    counts each run (solvers x seeds) to its end."""
    from fastflat.bench.hessian import run_hessian

    heard = []
    rows = run_hessian("fastcnn", "synthetic", 256, torch.device("cpu"), repeats=1, seeds=(0,),
                       progress=lambda stage, done, total: heard.append((stage, done, total)))
    stages = list(dict.fromkeys(stage for stage, _, _ in heard))
    assert [s.split(":")[0].split(" (")[0] for s in stages] == ["timing", "reference eigenvalue", "top eigenvalue"]
    assert [(d, t) for s, d, t in heard if s == stages[-1]] == [(i, len(rows)) for i in range(len(rows) + 1)]
    assert heard[0] == (stages[0], 0, 3) and (stages[0], 3, 3) in heard
