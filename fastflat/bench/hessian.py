"""`fastflat bench hessian`: what one Hessian-vector product costs against one gradient (rebuilding the
graph per product, and keeping it), and what the top eigenvalue costs by our Lanczos against PyHessian's
power iteration, at equal data, for a model on N fixed training examples (eval mode, as `fastflat
sharpness`).

    rows = run_hessian("cnn", "fashion-mnist", examples=1024, device=torch.device("cpu"), checkpoint="runs/sgd0")

Every solver row gives its products (HVPs), seconds and relative error against a reference eigenvalue
from Lanczos run to a residual of 1e-10. PyHessian itself runs when it is installed (`pip install
pyhessian`; its `hessian(model, criterion, data=(x, y)).eigenvalues()`, products counted), and its
stopping rule always runs on our operator ("PyHessian's rule"). Lanczos runs from a random vector and
from `fastflat sharpness`'s start vector (subsample_start); the second's HVPs count each product on the
subsample as its share of the examples (`full_hvps` and `start_hvps` give both counts).
`summarise(rows)` gives each solver's mean HVPs and median error over the seeds.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from fastflat import data as datasets
from fastflat.analysis.sharpness import (StageProgress, lanczos, model_operator, power_iteration, subsample,
                                         subsample_start)
from fastflat.bench.train import median_iqr, times_ms
from fastflat.data.models import build_model
from fastflat.flat import FlatParams

SEEDS = (0, 1, 2)  # start vectors: the iterative solvers' only randomness (the published tables: 0-4)
RANDOM, SUBSAMPLED = "lanczos, random start (fastflat)", "lanczos, subsample start (fastflat sharpness)"
POWER, PYHESSIAN = "power iteration, PyHessian's rule", "PyHessian 0.1"


def run_hessian(model_name: str, dataset: str, examples: int, device: torch.device, repeats: int = 5,
                tol: float = 1e-3, checkpoint: str | None = None, data_dir: str | None = None,
                seeds: tuple[int, ...] = SEEDS,
                progress: StageProgress = lambda stage, done, total: None) -> list[dict[str, Any]]:
    """Every row of the benchmark; `progress(stage, done, total)` hears the timings, the reference
    eigenvalue's products and each solver run."""
    if checkpoint is not None:
        from fastflat.load import load_run

        run = load_run(checkpoint, str(device), data_dir)
        data, model, model_name, dataset = run.data, run.model, run.config.model, run.config.dataset
        weights = f"trained ({checkpoint})"
    else:
        data = datasets.load_dataset(dataset, data_dir, device=device)
        torch.manual_seed(0)
        model = build_model(model_name, data.in_channels, data.num_classes, data.image_size).to(device)
        weights = "initialisation (seed 0)"
    model.eval()
    head = datasets.Split(data.train.images[:examples], data.train.labels[:examples])
    chunks = list(datasets.iterate_batches(head, 256, dataset=data, train=False))
    flat = FlatParams(model)
    rebuilt, kept = model_operator(flat, chunks, keep_graphs=False), model_operator(flat, chunks, keep_graphs=True)
    v = torch.randn(flat.numel, device=device)

    def gradient() -> None:
        flat.zero_grad_()
        for x, y in chunks:
            (F.cross_entropy(model(x), y) * (len(y) / examples)).backward()

    timing = "timing: a gradient, a product with its graph rebuilt, one with its graph kept"
    progress(timing, 0, 3)
    gradient(), rebuilt(v), kept(v)  # warm-up: allocator, lazy init
    grad_ms, _ = median_iqr(times_ms(gradient, repeats, device))
    progress(timing, 1, 3)
    hvp_ms, hvp_iqr = median_iqr(times_ms(lambda: rebuilt(v), repeats, device))
    progress(timing, 2, 3)
    kept_ms, kept_iqr = median_iqr(times_ms(lambda: kept(v), repeats, device))
    progress(timing, 3, 3)
    reference = lanczos(kept, flat.numel, k=1, tol=1e-10, max_iters=100, device=device,
                        progress=lambda done, total: progress("reference eigenvalue (Lanczos to 1e-10, at most)",
                                                              done, total))["eigenvalues"][0]
    few = subsample(chunks)
    base = {"model": model_name, "dataset": dataset, "examples": examples, "params": flat.numel, "weights": weights,
            "grad_ms": grad_ms, "hvp_ms": hvp_ms, "hvp_iqr_ms": hvp_iqr, "hvp_kept_ms": kept_ms,
            "hvp_kept_iqr_ms": kept_iqr, "hvp_over_grad": hvp_ms / grad_ms, "reference_eigenvalue": reference,
            "tol": tol, "start_examples": sum(len(y) for _, y in few or [])}
    solvers = {RANDOM: lambda seed: _lanczos(kept, flat.numel, tol, seed, device),
               SUBSAMPLED: lambda seed: _subsampled(flat, few, kept, tol, seed, device),
               POWER: lambda seed: _power(kept, flat.numel, tol, seed, device),
               PYHESSIAN: lambda seed: _pyhessian(model, head, data, tol, seed)}
    if few is None:  # under 32 examples in the subsample: sharpness starts from a random vector too
        del solvers[SUBSAMPLED]
    stage, total = f"top eigenvalue: {len(solvers)} solvers x {len(seeds)} seeds", len(solvers) * len(seeds)
    progress(stage, 0, total)
    rows = []
    for seed in seeds:
        for solver, run in solvers.items():
            rows.append(_solve(solver, lambda: run(seed), reference, base, seed))  # noqa: B023 (called here)
            progress(stage, len(rows), total)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per solver that ran: mean HVPs and median relative error over the seeds, and its mean HVPs over
    PyHessian's (or, without PyHessian, over PyHessian's rule on our operator)."""
    import statistics

    ran = {}
    for row in rows:
        if row["status"] == "ok":
            ran.setdefault(row["solver"], []).append(row)
    baseline = ran.get(PYHESSIAN) or ran.get(POWER)
    base_hvps = statistics.mean(r["hvps"] for r in baseline) if baseline else None
    out = []
    for solver, runs in ran.items():
        hvps = statistics.mean(r["hvps"] for r in runs)
        out.append({"solver": solver, "runs": len(runs), "mean_hvps": hvps,
                    "median_rel_error": statistics.median(r["rel_error"] for r in runs),
                    "max_rel_error": max(r["rel_error"] for r in runs),
                    "mean_seconds": statistics.mean(r["seconds"] for r in runs),
                    "hvps_over_baseline": hvps / base_hvps if base_hvps else None})
    return out


def _solve(solver: str, run, reference: float, base: dict[str, Any], seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        value, hvps = run()
    except ImportError as e:
        return {**base, "solver": solver, "seed": seed, "status": "unavailable", "reason": str(e), "eigenvalue": None,
                "hvps": None, "full_hvps": None, "start_hvps": None, "rel_error": None, "seconds": None}
    seconds = time.perf_counter() - start
    full, start_hvps = hvps if isinstance(hvps, tuple) else (hvps, 0)
    share = base["start_examples"] / base["examples"] if start_hvps else 0.0
    return {**base, "solver": solver, "seed": seed, "status": "ok", "reason": "", "eigenvalue": value,
            "hvps": full + start_hvps * share, "full_hvps": full, "start_hvps": start_hvps,
            "rel_error": abs(value - reference) / abs(reference), "seconds": seconds}


def _lanczos(op, n: int, tol: float, seed: int, device) -> tuple[float, int]:
    result = lanczos(op, n, k=1, tol=tol, seed=seed, device=device)
    return result["eigenvalues"][0], result["hvps"]


def _subsampled(flat: FlatParams, few, op, tol: float, seed: int, device) -> tuple[float, tuple[int, int]]:
    """fastflat sharpness's way: a start vector from the subsample's Hessian, then Lanczos on all examples."""
    start, start_hvps = subsample_start(model_operator(flat, few, keep_graphs=True), flat.numel, seed=seed, device=device)
    result = lanczos(op, flat.numel, k=1, tol=tol, seed=seed, device=device, start=start)
    return result["eigenvalues"][0], (result["hvps"], start_hvps)


def _power(op, n: int, tol: float, seed: int, device) -> tuple[float, int]:
    result = power_iteration(op, n, tol=tol, max_iters=100, seed=seed, device=device)  # PyHessian's maxIter
    return result["eigenvalue"], result["hvps"]


def _pyhessian(model: torch.nn.Module, head: datasets.Split, data: datasets.Dataset, tol: float, seed: int) -> tuple[float, int]:
    """PyHessian's own top eigenvalue on the same examples in one batch (its data= mode keeps one graph),
    its hessian_vector_product counted. It runs on a copy: its model.zero_grad() would set the gradients
    to None, cutting them from our flat buffer."""
    import copy
    import importlib
    import warnings

    try:
        ph = importlib.import_module("pyhessian.hessian")  # the module (the package's attribute is its class)
    except ImportError:
        raise ImportError("PyHessian is not installed (pip install pyhessian)") from None
    x, y = next(iter(datasets.iterate_batches(head, len(head), dataset=data, train=False)))
    calls, product = [0], ph.hessian_vector_product

    def counted(*args):
        calls[0] += 1
        return product(*args)

    ph.hessian_vector_product = counted
    try:
        with warnings.catch_warnings():  # PyHessian's backward(create_graph=True): torch warns of a reference cycle
            warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
            torch.manual_seed(seed)
            solver = ph.hessian(copy.deepcopy(model), torch.nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
            values, _ = solver.eigenvalues(maxIter=100, tol=tol, top_n=1)
    finally:
        ph.hessian_vector_product = product
    return float(values[0]), calls[0]
