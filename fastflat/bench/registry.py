"""The benchmarked ops, one `Op` entry each in `OPS`; a new fused op joins the benchmark by adding one.

    OPS["sam"].build("loop", bufs)    # -> Impl: the op's steps, as the per-parameter loop does them

An entry gives up to three builders: `loop` (a per-parameter Python loop, as the popular implementations
write it), `foreach` (torch._foreach_*) and `flat(bufs, kernel)`, our op on one flat vector with the torch
twins (kernel=False) or the Triton kernels (kernel=True). `torch.compile` of the flat twin is derived.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastflat import ops

from fastflat.ops import noise
from fastflat.bench.workloads import Buffers

PROVIDERS = ("loop", "foreach", "compile", "flat-torch", "triton")
REFERENCE = "flat-torch"  # every provider's result is checked against this one before it is timed
BASELINES = ("loop", "foreach", "compile")  # each row reports its speed-up over these


@dataclass
class Impl:
    """One provider's op on its own copy of the inputs. One call of the op = every step, in order."""

    steps: list[Callable[[], Any]]
    result: Callable[[], list[Tensor]]  # what the check compares after each step

    def __call__(self) -> None:
        for step in self.steps:
            step()


@dataclass(frozen=True)
class Op:
    name: str
    summary: str  # what one call does
    floor: int  # elements each parameter must move per call (reads + writes) in a fully fused version
    floor_detail: str  # how `floor` is counted
    flat: Callable[[Buffers, bool], Impl]  # (bufs, kernel): our op on one (N,) vector
    loop: Callable[[Buffers], Impl] | None = None
    foreach: Callable[[Buffers], Impl] | None = None

    def build(self, provider: str, bufs: Buffers) -> Impl:
        """The provider's Impl; raises LookupError when this op has none for that provider."""
        builders = {"loop": self.loop, "foreach": self.foreach,
                    "flat-torch": lambda b: self.flat(b, False), "triton": lambda b: self.flat(b, True),
                    "compile": lambda b: compiled(self.flat(b, False))}
        if builders.get(provider) is None:
            raise LookupError(f"{self.name} has no {provider} implementation")
        return builders[provider](bufs)


def compiled(impl: Impl) -> Impl:
    """The same steps through torch.compile; compile errors surface on the first call.

    Graph breaks are allowed, as a user would allow them: torch.optim's step breaks the graph itself.
    """
    torch._dynamo.reset()  # dynamo caches per code object: past 8 shapes it would silently run eager
    return Impl([torch.compile(s, dynamic=False) for s in impl.steps], impl.result)


def _pick(kernel: bool, name: str, twin: Callable) -> Callable:
    """The Triton launcher fastflat.ops.kernels.<name> if `kernel`, else its torch twin (same arguments)."""
    if not kernel:
        return twin
    from fastflat.ops import kernels  # imported late: only the triton provider needs it

    return getattr(kernels, name)


def _with_grads(params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    for p, g in zip(params, grads):
        p.grad = g
    return params


# -- squared norm ------------------------------------------------------------------------------------
def _sqnorm_loop(bufs: Buffers) -> Impl:
    gs, out = bufs.listed("g"), [None]

    def step():  # davda54/sam's _grad_norm, squared
        out[0] = torch.norm(torch.stack([g.norm(p=2) for g in gs]), p=2) ** 2

    return Impl([step], lambda: [out[0]])


def _sqnorm_foreach(bufs: Buffers) -> Impl:
    gs, out = bufs.listed("g"), [None]

    def step():
        out[0] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs))) ** 2

    return Impl([step], lambda: [out[0]])


def _sqnorm_flat(bufs: Buffers, kernel: bool) -> Impl:
    g, out = bufs.flat("g"), [None]
    sqnorm = _pick(kernel, "sqnorm", ops.sqnorm_torch)

    def step():
        out[0] = sqnorm(g)

    return Impl([step], lambda: [out[0]])


# -- global-norm clipping ----------------------------------------------------------------------------
# A negative limit keeps every call on the clipping branch: the coefficient settles at -1, so g flips
# sign and keeps its size. With a positive one, g would sit at the limit after the first call and a
# kernel that skips the write when no clipping is needed would be timed doing nothing.
MAX_NORM = -1.0


def _clip_torch_utils(bufs: Buffers, foreach: bool) -> Impl:
    params = _with_grads(bufs.listed("w"), bufs.listed("g"))
    step = lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=foreach)  # noqa: E731
    return Impl([step], lambda: [p.grad for p in params])


def _clip_flat(bufs: Buffers, kernel: bool) -> Impl:
    g = bufs.flat("g")
    sqnorm, scale_ = _pick(kernel, "sqnorm", ops.sqnorm_torch), _pick(kernel, "clip_scale_", ops.clip_scale_torch_)

    def step():
        scale_(g, sqnorm(g).sqrt(), MAX_NORM)

    return Impl([step], lambda: [g])


# -- SAM perturb + restore (+ SGD step) --------------------------------------------------------------
LR, MOMENTUM = 0.1, 0.9


def _rho(bufs: Buffers) -> float:
    # rho = sqrt(N) gives e = rho g / ||g|| unit RMS, as large as w: a wrong e cannot hide under rounding
    return math.sqrt(bufs.numel)


def _sam_loop(bufs: Buffers, sgd: bool) -> Impl:
    """davda54/sam's first_step / second_step: clone each p, add e, later p.data = old_p."""
    ws, gs, rho, old = bufs.listed("w"), bufs.listed("g"), _rho(bufs), []
    opt = torch.optim.SGD(_with_grads(ws, gs), lr=LR, momentum=MOMENTUM, foreach=False) if sgd else None

    def first_step():
        grad_norm = torch.norm(torch.stack([g.norm(p=2) for g in gs]), p=2)
        scale = rho / (grad_norm + 1e-12)
        old[:] = []
        for w, g in zip(ws, gs):
            old.append(w.data.clone())
            w.add_(g * scale.to(w))

    def second_step():
        for w, o in zip(ws, old):
            w.data = o
        if opt is not None:
            opt.step()

    return Impl([first_step, second_step], lambda: ws)


def _sam_foreach(bufs: Buffers, sgd: bool) -> Impl:
    ws, gs, rho = bufs.listed("w"), bufs.listed("g"), _rho(bufs)
    backups = [torch.empty_like(w) for w in ws]
    opt = torch.optim.SGD(_with_grads(ws, gs), lr=LR, momentum=MOMENTUM, foreach=True) if sgd else None

    def perturb():
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))
        torch._foreach_copy_(backups, ws)
        torch._foreach_add_(ws, torch._foreach_mul(gs, rho / (grad_norm + 1e-12)))

    def restore():
        torch._foreach_copy_(ws, backups)
        if opt is not None:
            opt.step()

    return Impl([perturb, restore], lambda: ws)


def _sam_flat(bufs: Buffers, kernel: bool, sgd: bool) -> Impl:
    w, g, rho = bufs.flat("w"), bufs.flat("g"), _rho(bufs)
    backup = torch.empty_like(w)
    sqnorm = _pick(kernel, "sqnorm", ops.sqnorm_torch)
    perturb_ = _pick(kernel, "sam_perturb_", ops.sam_perturb_torch_)
    opt = torch.optim.SGD(_with_grads([w], [g]), lr=LR, momentum=MOMENTUM) if sgd else None

    def perturb():
        perturb_(w, g, backup, sqnorm(g), rho, "l2", False)

    def restore():
        w.copy_(backup)
        if opt is not None:
            opt.step()

    return Impl([perturb, restore], lambda: [w])


# -- weight averaging (SWA running mean) -------------------------------------------------------------
def _average_swa_utils(bufs: Buffers, foreach: bool) -> Impl:
    """torch.optim.swa_utils.AveragedModel.update_parameters, its per-parameter or its foreach path."""
    from torch.optim.swa_utils import AveragedModel, get_swa_avg_fn, get_swa_multi_avg_fn

    model = torch.nn.ParameterList(bufs.listed("w"))
    averager = (AveragedModel(model, multi_avg_fn=get_swa_multi_avg_fn()) if foreach
                else AveragedModel(model, avg_fn=get_swa_avg_fn()))
    with torch.no_grad():
        for p, a in zip(averager.module.parameters(), bufs.listed("avg")):
            p.copy_(a)
    averager.n_averaged.fill_(1)  # one model averaged already: every timed call is a real update
    return Impl([lambda: averager.update_parameters(model)], lambda: list(averager.module.parameters()))


def _average_flat(bufs: Buffers, kernel: bool) -> Impl:
    avg, w = bufs.flat("avg"), bufs.flat("w")
    count = torch.ones((), dtype=torch.int64, device=avg.device)  # models averaged so far, on the device
    average_ = _pick(kernel, "average_", ops.average_torch_)

    def step():
        average_(avg, w, count, None)
        count.add_(1)

    return Impl([step], lambda: [avg])


# -- evolution strategies: noise regenerated from (seed, member), never stored ------------------------
SEED, MEMBER, SIGMA, ALPHA, ES_MEMBERS = 1234, 3, 0.5, 0.1, 8


def _es_perturb_flat(bufs: Buffers, kernel: bool) -> Impl:
    w = bufs.flat("w")
    out = torch.empty_like(w)
    perturb_into_ = _pick(kernel, "perturb_into_", noise.perturb_into_torch_)
    step = lambda: perturb_into_(out, w, SEED, MEMBER, SIGMA, "normal")  # noqa: E731
    return Impl([step], lambda: [out])


def _es_update_flat(bufs: Buffers, kernel: bool) -> Impl:
    w = bufs.flat("w")
    members = torch.arange(ES_MEMBERS, device=w.device)  # (K,) int64
    coeffs = torch.linspace(-1.0, 1.0, ES_MEMBERS, device=w.device)  # (K,) fp32 fitness weights
    update_ = _pick(kernel, "weighted_noise_sum_", noise.weighted_noise_sum_torch_)
    step = lambda: update_(w, SEED, members, coeffs, ALPHA, "normal")  # noqa: E731
    return Impl([step], lambda: [w])


OPS: dict[str, Op] = {op.name: op for op in (
    Op("sqnorm", "||g||^2 over all parameters", 1, "read g",
       flat=_sqnorm_flat, loop=_sqnorm_loop, foreach=_sqnorm_foreach),
    Op("clip", "clip_grad_norm_: norm, then g *= max_norm / ||g||", 3, "norm: read g; scale: read g, write g",
       flat=_clip_flat, loop=lambda b: _clip_torch_utils(b, False), foreach=lambda b: _clip_torch_utils(b, True)),
    Op("sam", "SAM ascent w += rho g/||g|| (saving w), then exact restore", 7,
       "norm: read g; perturb: read w, g, write w, backup; restore: read backup, write w",
       flat=lambda b, k: _sam_flat(b, k, sgd=False), loop=lambda b: _sam_loop(b, sgd=False),
       foreach=lambda b: _sam_foreach(b, sgd=False)),
    Op("sam+sgd", "SAM perturb + restore, then torch.optim.SGD (momentum 0.9)", 10,
       "norm: read g; perturb: read w, g, write w, backup; restore fused with SGD: read backup, g, buf, write w, buf",
       flat=lambda b, k: _sam_flat(b, k, sgd=True), loop=lambda b: _sam_loop(b, sgd=True),
       foreach=lambda b: _sam_foreach(b, sgd=True)),
    Op("average", "SWA running mean: avg += (w - avg) / (n + 1)", 3, "read avg, w; write avg",
       flat=_average_flat, loop=lambda b: _average_swa_utils(b, False),
       foreach=lambda b: _average_swa_utils(b, True)),
    Op("es-perturb", "ES member weights: out = w + sigma eps_k, eps_k regenerated from (seed, k)", 2,
       "read w, write out (the noise is computed, never read)", flat=_es_perturb_flat),
    Op("es-update", f"ES update: w += alpha sum_k c_k eps_k over K={ES_MEMBERS} members", 2,
       "read w, write w (K noise vectors computed, never read)", flat=_es_update_flat),
)}
