"""Sharpness of trained weights: top Hessian eigenvalues, the Hessian trace, and SAM's m-sharpness.

    op = model_operator(flat, chunks)                 # v -> H v of the training loss, (N,) fp32
    lanczos(op, n, k=3)   power_iteration(op, n)   hutchinson(op, n, probes=64)
    start, _ = subsample_start(model_operator(flat, subsample(chunks)), n)   # then lanczos(op, n, start=start)
    m_sharpness(flat, batches, rho=0.05, ball="l2")   # mean over batches of max_{|e|<=rho} L(w+e) - L(w)

The algorithms see only an operator v -> H v on (N,) vectors, so they are checked on matrices with a
known spectrum; `model_operator` supplies one for a model in eval mode (BatchNorm on running statistics:
the loss is then a fixed function of the weights), each product one double backward (fastflat.loss.hessian).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflat.errors import UserError
from fastflat.loss.evaluation import at_least_fp32
from fastflat.flat import FlatParams
from fastflat.loss.hessian import KeptGraphs, graph_bytes, hvp

Operator = Callable[[Tensor], Tensor]  # (N,) -> (N,), symmetric
StageProgress = Callable[[str, int, int], None]  # (what is being measured, done, total)


class CountedOperator:
    """Wraps an operator and counts its products: the cost every result reports."""

    def __init__(self, op: Operator):
        self.op, self.calls = op, 0

    def __call__(self, v: Tensor) -> Tensor:
        self.calls += 1
        return self.op(v)


def model_operator(flat: FlatParams, chunks: list[tuple[Tensor, Tensor]], keep_graphs: bool | None = None) -> CountedOperator:
    """H v of the mean cross-entropy over `chunks` at the model's weights (one flat group). With
    keep_graphs each chunk's gradient graph is built once and every product is one backward through
    them (no forward pass); None keeps them when they fit in a quarter of the memory (keeps_graphs)."""
    if len(flat.vectors) != 1:
        raise UserError("sharpness needs every trainable parameter in one dtype on one device")
    if keep_graphs is None:
        keep_graphs = keeps_graphs(flat, chunks)
    product = KeptGraphs(flat, chunks) if keep_graphs else (lambda vs: hvp(flat, chunks, vs))
    op = CountedOperator(lambda v: product([v.to(flat.params[0].dtype)])[0].to(v.dtype))
    op.kept_graphs = keep_graphs
    return op


def keeps_graphs(flat: FlatParams, chunks: list[tuple[Tensor, Tensor]]) -> bool:
    """Whether every chunk's gradient graph fits in a quarter of the free memory (on a GPU) or of the
    machine's memory (on a CPU), by one chunk's measured graph times the number of chunks."""
    import os

    if not chunks:
        return False
    device = chunks[0][0].device
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 4
    else:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    return graph_bytes(flat, chunks[0]) * len(chunks) <= budget


def _unit(n: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device, dtype)
    return v / v.norm()


LANCZOS_MAX_ITERS = 50  # fastflat sharpness: Lanczos steps at most, so at most this many top eigenvalues


def power_iteration(op: Operator, n: int, tol: float = 1e-4, max_iters: int = 200, seed: int = 0,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The eigenvalue of largest magnitude, by v <- H v / |H v| until the Rayleigh quotient moves less
    than tol (relative). The reference for Lanczos' top eigenvalue."""
    v = _unit(n, torch.Generator().manual_seed(seed), torch.device(device), dtype)
    value, calls = 0.0, 0
    for calls in range(1, max_iters + 1):
        hv = op(v)
        new = float(v @ hv)
        norm = hv.norm()
        if norm == 0:
            return {"eigenvalue": 0.0, "hvps": calls, "converged": True}
        v = hv / norm
        if calls > 1 and abs(new - value) <= tol * abs(new):
            return {"eigenvalue": new, "hvps": calls, "converged": True}
        value = new
    return {"eigenvalue": value, "hvps": calls, "converged": False}


def lanczos(op: Operator, n: int, k: int = 1, tol: float = 1e-3, max_iters: int = 100, seed: int = 0,
            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            progress: Callable[[int, int], None] | None = None, start: Tensor | None = None) -> dict[str, Any]:
    """The k largest (algebraic) eigenvalues by Lanczos with full reorthogonalisation, from `start`
    ((N,), e.g. subsample_start's vector) or else a random unit vector drawn from `seed`.

    Stops when each of the top-k Ritz values theta is within tol |theta| of an eigenvalue, by the bound
    min(r, r^2 / gap) on that distance: r = |beta_j s_jk| is the residual |H y - theta y| of the Ritz pair
    (Paige), and r^2 / gap the sharper bound of Kato and Temple once the Ritz value is separated by `gap`
    from the rest of the spectrum (estimated by the nearest other Ritz value, and from the next
    one down for the k-th). The residual alone would ask for ~sqrt(tol) more accuracy than the
    eigenvalue needs: the top eigenvalue converges quadratically faster than its vector. Also stops at
    an invariant subspace, or at max_iters. `progress(done, max_iters)` hears every product."""
    if k < 1:
        raise UserError(f"top K = {k} is invalid: ask for at least 1 eigenvalue")
    if start is None:
        q = _unit(n, torch.Generator().manual_seed(seed), torch.device(device), dtype)
    else:
        q = start.to(device, dtype) / start.norm()
    ritz, _, _ = _lanczos_until(op, q, k, tol, min(max_iters, n), progress)
    return {"eigenvalues": ritz.flip(0)[:k].tolist(), "hvps": len(ritz), "tolerance": tol}


def _lanczos_until(op: Operator, q: Tensor, k: int, tol: float, steps: int,
                   progress: Callable[[int, int], None] | None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Lanczos from q until each top-k Ritz value is within tol |theta| of an eigenvalue (error_bounds), at an
    invariant subspace, or after `steps` products. Returns the Ritz values (j,) ascending, T's eigenvectors
    (j, j) and the j Lanczos vectors (N,) they are written in; j is the number of products."""
    ritz, vectors, basis = torch.zeros(0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64), [q]
    for alphas, betas, beta, basis in _lanczos_steps(op, q, steps):
        if progress is not None:
            progress(len(alphas), steps)
        ritz, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))  # ascending
        if len(alphas) >= k and bool((error_bounds(ritz, vectors, beta, k) <= tol * ritz[-k:].abs().clamp_min(1e-30)).all()):
            break
    return ritz, vectors, basis[: len(ritz)]  # the generator may have appended the next vector


SUBSAMPLE = 8  # subsample_start's operator sees every 8th example: each of its products costs ~1/8 of one on all


def subsample(chunks: list[tuple[Tensor, Tensor]], every: int = SUBSAMPLE) -> list[tuple[Tensor, Tensor]] | None:
    """Every `every`-th example of each chunk (spread over the data, whatever its order), or None when that
    leaves fewer than 32 examples: too few for a Hessian whose top eigenvectors resemble the whole one's."""
    picked = [(x[::every], y[::every]) for x, y in chunks]
    return picked if sum(len(y) for _, y in picked) >= 32 else None


def subsample_start(op: Operator, n: int, k: int = 1, tol: float = 1e-2, max_iters: int = 10, seed: int = 0,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    progress: Callable[[int, int], None] | None = None) -> tuple[Tensor, int]:
    """A start vector for Lanczos on H: the sum of the top-k Ritz vectors of a short, loose (tol) Lanczos
    run on `op`, a cheap operator close to H (the Hessian of a subsample of H's data). Returns (vector
    (N,), products of op). From it, Lanczos on H needs fewer products than from a random vector: a random
    vector must first be rid of the bulk of the spectrum and of the next eigenvectors, and this one mostly
    is already (for a trained CNN on 1,024 examples, 1/8 of them gave cos^2 ~ 0.9-0.95 with H's top
    eigenvector). Its error, the subsample's noise, is what the full products then remove."""
    q = _unit(n, torch.Generator().manual_seed(seed), torch.device(device), dtype)
    ritz, vectors, basis = _lanczos_until(op, q, k, tol, min(max_iters, n), progress)
    weights = vectors[:, -k:].sum(1).to(q.device, q.dtype)  # (j,): the top-k Ritz vectors' sum, in the basis
    start = torch.stack(basis).T @ weights
    return start / start.norm(), len(ritz)


def error_bounds(ritz: Tensor, vectors: Tensor, beta: float, k: int) -> Tensor:
    """For the top k Ritz values (ascending, as eigh gives them): min(r, r^2 / gap), a bound on each one's
    distance to an eigenvalue of H. The gap is to the nearest other Ritz value. Until there are two
    Ritz values below the k-th, the residual alone is the bound: the lowest Ritz value of a short run
    sits in the bulk of the spectrum, far below the next eigenvalue, so the gap to it would be too wide
    (from a good start vector, 2 steps would claim 1e-3 with an error of 2e-3)."""
    top = ritz[-k:]
    residuals = (beta * vectors[-1, -k:]).abs()
    if len(ritz) < k + 2:
        return residuals
    others = (ritz[None, :] - top[:, None]).abs()  # (k, m)
    others[torch.arange(k), torch.arange(len(ritz) - k, len(ritz))] = float("inf")  # not the value itself
    gaps = others.min(1).values
    return torch.minimum(residuals, residuals**2 / gaps.clamp_min(1e-300))


def _lanczos_steps(op: Operator, q: Tensor, steps: int):
    """Lanczos from the unit vector q with full reorthogonalisation (twice: keeps the basis orthogonal
    in fp32). After each product it yields (alphas, betas, beta, basis): T's entries so far, the norm of
    the next residual and the Lanczos vectors, one per alpha; resuming appends the next vector and takes
    the next step. Ends after `steps` products or at an invariant subspace (beta ~ 0, where the Ritz
    values are exact). Memory holds the basis, (steps, N)."""
    basis, alphas, betas = [q], [], []
    for j in range(steps):
        w = op(basis[j])
        alphas.append(float(basis[j] @ w))
        w = w - alphas[j] * basis[j] - (betas[j - 1] * basis[j - 1] if j > 0 else 0)
        stacked = torch.stack(basis)  # (j+1, N)
        for _ in range(2):
            w = w - stacked.T @ (stacked @ w)
        beta = float(w.norm())
        yield alphas, betas, beta, basis
        if beta < 1e-10:
            return
        betas.append(beta)
        basis.append(w / beta)


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    """Lanczos' T: alphas on the diagonal, the first len(alphas) - 1 betas beside it, fp64."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def slq_density(op: Operator, n: int, probes: int = 4, steps: int = 30, seed: int = 0,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019): per probe, `steps` Lanczos steps from a random
    unit vector give nodes (Ritz values) and weights (squared first components of T's eigenvectors) that
    sum to 1; their average over probes estimates the spectral density. Returns every node and weight."""
    generator = torch.Generator().manual_seed(seed)
    nodes, weights, hvps = [], [], 0
    for _ in range(probes):
        q = _unit(n, generator, torch.device(device), dtype)
        for alphas, betas, _, _ in _lanczos_steps(op, q, min(steps, n)):
            if progress is not None:  # run to the end: every step sharpens the quadrature
                progress(hvps + len(alphas), probes * min(steps, n))
        hvps += len(alphas)
        theta, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        nodes.append(theta)
        weights.append(vectors[0] ** 2 / probes)
    return {"nodes": torch.cat(nodes).tolist(), "weights": torch.cat(weights).tolist(), "hvps": hvps}


def density_curve(nodes: list[float], weights: list[float], sigma: float | None = None,
                  points: int = 400) -> tuple[Tensor, Tensor]:
    """The SLQ density smoothed by Gaussians of width sigma (default: 1% of the node range): (t, p(t))."""
    x = torch.tensor(nodes, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    span = float(x.max() - x.min()) or 1.0
    sigma = sigma or 0.01 * span
    t = torch.linspace(float(x.min()) - 0.05 * span, float(x.max()) + 0.05 * span, points, dtype=torch.float64)
    p = (w[None, :] * torch.exp(-((t[:, None] - x[None, :]) ** 2) / (2 * sigma**2))).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return t, p


def hutchinson(op: Operator, n: int, probes: int = 64, seed: int = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """tr(H) ~ mean of z^T H z over Rademacher probes z, with its standard error (std / sqrt(probes))."""
    if probes < 2:
        raise UserError(f"trace probes = {probes} is invalid: a standard error needs at least 2")
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(probes):
        z = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(device, dtype)
        samples.append(float(z @ op(z)))
        if progress is not None:
            progress(len(samples), probes)
    values = torch.tensor(samples, dtype=torch.float64)
    return {"trace": float(values.mean()), "trace_stderr": float(values.std() / math.sqrt(probes)), "hvps": probes}


# -- SAM's sharpness: the worst loss increase inside a ball ----------------------------------------------
LossGrad = Callable[[Tensor], tuple[float, Tensor]]  # e (N,) -> (L(w + e), grad of L at w + e)


def ascend_in_ball(loss_grad: LossGrad, w: Tensor, rho: float, ball: str = "l2", adaptive: bool = False,
                   steps: int = 20, seed: int = 0) -> dict[str, Any]:
    """max over e in the ball of L(w + e) - L(w), by projected, normalised gradient ascent.

    L2 ball |e| <= rho, L-inf ball |e_i| <= rho; adaptive scales the ball by |w| elementwise (e = |w| d,
    d in the plain ball), as in adaptive sharpness (Kwon et al. 2021). Starts from a small seeded random
    point (at a minimum the gradient at e = 0 is zero), takes steps of 2 rho / sqrt(steps) along the
    normalised gradient (its sign for L-inf), projects back into the ball, and keeps the best point seen."""
    if rho <= 0:
        raise UserError(f"rho = {rho} is invalid: the ball needs a radius > 0")
    scale = w.abs() if adaptive else torch.ones_like(w)
    base, _ = loss_grad(torch.zeros_like(w))
    start = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(w)
    d = 0.1 * rho * (start / start.norm() if ball == "l2" else start.sign())  # position inside the plain ball
    best, step = 0.0, rho / math.sqrt(max(steps, 1)) * 2
    for _ in range(steps):
        loss, g = loss_grad(scale * d)
        best = max(best, loss - base)
        gd = g * scale  # gradient with respect to d
        if ball == "l2":
            d = d + step * gd / (gd.norm() + 1e-12)
            d = d * torch.clamp(rho / (d.norm() + 1e-12), max=1.0)
        else:
            d = (d + step * gd.sign()).clamp(-rho, rho)
    loss, _ = loss_grad(scale * d)
    return {"sharpness": max(best, loss - base), "e": scale * d}


def m_sharpness(flat: FlatParams, batches: list[tuple[Tensor, Tensor]], rho: float, ball: str = "l2",
                adaptive: bool = False, steps: int = 20, progress: Callable[[int, int], None] | None = None) -> float:
    """Mean over `batches` (m examples each) of each batch's own worst increase within the ball: SAM's
    m-sharpness. The weights are restored exactly after each batch."""
    if len(flat.vectors) != 1:
        raise UserError("sharpness needs every trainable parameter in one dtype on one device")
    model, w = flat.model, flat.params[0]
    saved = w.detach().clone()

    def loss_grad_on(x: Tensor, y: Tensor) -> LossGrad:
        def f(e: Tensor) -> tuple[float, Tensor]:
            with torch.no_grad():
                w.copy_(saved + e)
            flat.zero_grad_()
            with torch.enable_grad():
                loss = F.cross_entropy(at_least_fp32(model(x)), y)
                loss.backward()
            return float(loss.detach()), flat.grads[0].detach().clone()
        return f

    values = []
    try:
        for x, y in batches:
            values.append(ascend_in_ball(loss_grad_on(x, y), saved, rho, ball, adaptive, steps)["sharpness"])
            if progress is not None:
                progress(len(values), len(batches))
    finally:
        with torch.no_grad():
            w.copy_(saved)
    return sum(values) / len(values)


# -- a run's sharpness, as `fastflat sharpness` reports it ------------------------------------------------
def measure_checkpoint(path: str, examples: int = 2048, top: int = 1, probes: int = 32, ms: tuple[int, ...] = (),
                       rho: float = 0.05, balls: tuple[str, ...] = ("l2",), adaptive: bool = False,
                       tol: float = 1e-3, max_iters: int = LANCZOS_MAX_ITERS, device: str = "auto", data_dir: str | None = None,
                       density: int = 0, progress: StageProgress = lambda stage, done, total: None) -> dict[str, Any]:
    """Every measure for one run directory or checkpoint, on its first `examples` training examples
    (no augmentation), model in eval mode. `ms`: batch sizes m for m-sharpness (empty: skipped);
    `density`: SLQ probes for the spectral density (0: skipped). A member
    file (RUN/members/swa.pt, a snapshot) is measured with its run's config."""
    from fastflat import data as datasets
    from fastflat.load import load_run

    run = load_run(path, device, data_dir)
    cfg, data, model, dev = run.config, run.data, run.model, run.device
    if examples > len(data.train):
        raise UserError(f"--examples {examples} is larger than the {len(data.train)} training examples of {cfg.dataset}")
    head = datasets.Split(data.train.images[:examples], data.train.labels[:examples])
    chunks = list(datasets.iterate_batches(head, 256, dataset=data, train=False))
    model.eval()  # BatchNorm on running statistics: the loss is a fixed function of the weights
    flat = FlatParams(model)
    op = model_operator(flat, chunks)
    n = flat.numel
    stage = lambda what: lambda done, total: progress(f"{path}: {what}", done, total)  # noqa: E731
    start, start_hvps, few = None, 0, subsample(chunks)
    few_examples = sum(len(y) for _, y in few or [])
    if few is not None:  # a start vector from every 8th example: ~1 full product saved for ~1/2 of one
        start, start_hvps = subsample_start(model_operator(flat, few, op.kept_graphs), n, k=top, device=dev,
                                            progress=stage(f"start vector (Lanczos on {few_examples} examples, at most)"))
    eig = lanczos(op, n, k=top, tol=tol, max_iters=max_iters, device=dev, start=start,
                  progress=stage(f"top {top} eigenvalue{'s' if top > 1 else ''} (Lanczos, at most)"))
    result = {"checkpoint": str(path), "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method,
              "examples": examples, "mode": "eval (BatchNorm running statistics)", "params": n,
              "top_eigenvalues": eig["eigenvalues"], "hvps": eig["hvps"], "lanczos_tol": tol,
              "start_hvps": start_hvps, "start_examples": few_examples,
              "kept_graphs": op.kept_graphs}
    if probes:
        op.calls = 0
        tr = hutchinson(op, n, probes=probes, device=dev, progress=stage("trace (Hutchinson probes)"))
        result.update(trace=tr["trace"], trace_stderr=tr["trace_stderr"], hvps=result["hvps"] + tr["hvps"])
    if density:
        result["density"] = slq_density(op, n, probes=density, device=dev,
                                        progress=stage(f"spectral density (SLQ, {density} probes)"))
        result["hvps"] += result["density"]["hvps"]
    sharp: dict[str, float] = {}
    for m in ms:
        batches = [(head.images[i : i + m], head.labels[i : i + m]) for i in range(0, examples - m + 1, m)]
        batches = [next(iter(datasets.iterate_batches(datasets.Split(x, y), m, dataset=data, train=False))) for x, y in batches]
        for ball in balls:
            key = f"{'a' if adaptive else ''}{ball}_m{m}"
            sharp[key] = m_sharpness(flat, batches, rho, ball, adaptive, progress=stage(
                f"{'adaptive ' if adaptive else ''}{ball} sharpness, m = {m} (batches)"))
    if sharp:
        result.update(sharpness=sharp, rho=rho)
    return result
