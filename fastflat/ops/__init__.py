"""Fused ops on flat vectors: each is a pure-torch twin (CPU path, test oracle) routed to a Triton kernel.

Routing: Triton when the tensor is on CUDA and triton imports, the torch twin otherwise.
`FASTFLAT_BACKEND=torch|triton` forces one; tests force `triton` on CPU under `TRITON_INTERPRET=1`.
Every op takes lists of (N,) vectors, one per (device, dtype) group of a FlatParams, and reduces
across the list on the device (no host synchronisation).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend() -> str:
    choice = os.environ.get("FASTFLAT_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"FASTFLAT_BACKEND={choice!r}: use one of {', '.join(BACKENDS)}")
    return choice


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # kernels do fp32 math; fp64 stays fp64


def math_dtype(t: Tensor) -> torch.dtype:
    """The dtype an op computes in for `t`: fp32, or fp64 for fp64 storage (never less precise than it)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def use_triton(t: Tensor) -> bool:
    """Whether the op on `t` runs the Triton kernel (else the torch twin)."""
    choice = backend()
    if choice == "torch" or t.dtype not in KERNEL_DTYPES:
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("FASTFLAT_BACKEND=triton but triton does not import")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("FASTFLAT_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1")
        return True
    return t.is_cuda and triton_available()


def triton_kernels():
    from fastflat.ops import kernels  # imported late: triton is optional off Linux and slow to import

    return kernels


# -- squared norm ------------------------------------------------------------------------------------
def sqnorm_torch(x: Tensor, scale: Tensor | None = None) -> Tensor:
    """sum((|scale| * x)^2) in fp32 (fp64 for fp64 x), shape (1,)."""
    x = x.to(math_dtype(x))
    if scale is not None:
        x = x * scale.to(x.dtype).abs()
    return torch.dot(x, x).reshape(1)


def sqnorm(x: Tensor, scale: Tensor | None = None) -> Tensor:
    if use_triton(x):
        return triton_kernels().sqnorm(x, scale)
    return sqnorm_torch(x, scale)


def total_sqnorm(xs: list[Tensor], scales: list[Tensor] | None = None) -> Tensor:
    """Squared L2 norm over several vectors, (1,) fp32 (fp64 if any is fp64) on the first one's device."""
    scales = scales if scales is not None else [None] * len(xs)
    parts = [sqnorm(x, s).to(xs[0].device) for x, s in zip(xs, scales)]
    if len(parts) == 1:
        return parts[0]
    widest = torch.promote_types(*{p.dtype for p in parts}) if len({p.dtype for p in parts}) > 1 else parts[0].dtype
    return torch.stack([p.to(widest) for p in parts]).sum(0)


# -- SAM perturb and restore -------------------------------------------------------------------------
SAM_NORMS = ("l2", "linf")


def sam_perturb_torch_(
    w: Tensor, g: Tensor, backup: Tensor, sqnorm: Tensor | None, rho: float, norm: str,
    adaptive: bool, eps: float = 1e-12, weight_mask: Tensor | None = None,
) -> None:
    """Twin of kernels.sam_perturb_: backup <- w; w <- w + e (see kernels/sam.py for e)."""
    backup.copy_(w)
    if w.dtype in (torch.float32, torch.float64) and norm == "l2" and not adaptive and weight_mask is None:
        # the common case: one in-place pass, no temporary, in the weights' own precision
        w.addcmul_(g, (rho / (sqnorm.sqrt() + eps)).to(w.dtype))
        return
    w32, g32 = w.to(math_dtype(w)), g.to(math_dtype(w))
    if norm == "l2":
        e = g32 * (rho / (sqnorm.sqrt() + eps))
        if adaptive:
            e = e * w32 * w32
    else:
        e = rho * torch.sign(g32)
        if adaptive:
            e = e * w32.abs()
    if weight_mask is not None:
        e = e * weight_mask.to(e.dtype)
    w.copy_(w32 + e)


def sam_perturb_(
    ws: list[Tensor], gs: list[Tensor], backups: list[Tensor], rho: float, norm: str = "l2",
    adaptive: bool = False, weight_masks: list[Tensor] | None = None,
) -> Tensor:
    """SAM's ascent step over flat vectors: save each w into its backup, then move to w + e.

    For L2 the norm is global over all vectors (one reduction each, summed on the device). Returns
    the squared norm of the (scaled) gradient that set e, (1,) on the device, so callers can check it
    is finite; for L-inf, where e needs no norm, it is computed for that check alone. `weight_masks`
    (0/1 per weight: SAM-ON's normalization layers, ESAM's random subset) moves only those weights,
    and the norm is then the masked gradient's, so the step still has length rho.
    """
    if norm not in SAM_NORMS:
        raise ValueError(f"unknown SAM norm {norm!r}: use one of {', '.join(SAM_NORMS)}")
    scales = ws if adaptive else None
    if weight_masks is not None:
        scales = [m * w.abs() for m, w in zip(weight_masks, ws)] if adaptive else weight_masks
    total = total_sqnorm(gs, scales)
    masks = weight_masks or [None] * len(ws)
    for w, g, b, m in zip(ws, gs, backups, masks):
        if use_triton(w):
            triton_kernels().sam_perturb_(w, g, b, total.to(w.device, torch.float32), rho, norm, adaptive,
                                          weight_mask=m)
        else:
            sam_perturb_torch_(w, g, b, total.to(w.device), rho, norm, adaptive, weight_mask=m)
    return total


def restore_(ws: list[Tensor], backups: list[Tensor]) -> None:
    """Undo sam_perturb_ exactly: a copy of the saved bits (a copy is already one pass at copy speed)."""
    for w, b in zip(ws, backups):
        w.copy_(b)


# -- global-norm clipping ----------------------------------------------------------------------------
def clip_scale_torch_(g: Tensor, total_norm: Tensor, max_norm: float) -> None:
    """Twin of kernels.clip_scale_: g *= min(1, max_norm / (total_norm + 1e-6)), torch's formula."""
    coef = (max_norm / (total_norm.to(math_dtype(g)) + 1e-6)).clamp(max=1.0)
    if g.dtype in (torch.float32, torch.float64):
        g.mul_(coef)  # in place, one pass
    else:
        g.copy_(g.float() * coef)


def clip_scale_(gs: list[Tensor], total_norm: Tensor, max_norm: float) -> None:
    """Scale each vector by min(1, max_norm / (total_norm + 1e-6)), torch's formula, in place."""
    for g in gs:
        if use_triton(g):
            triton_kernels().clip_scale_(g, total_norm.to(g.device, torch.float32), max_norm)
        else:
            clip_scale_torch_(g, total_norm.to(g.device), max_norm)


def clip_grad_norm_flat_(gs: list[Tensor], max_norm: float, sqnorm: Tensor | None = None) -> Tensor:
    """Clip flat gradient vectors to a global L2 norm; returns the norm before clipping, () fp32
    (fp64 if any vector is fp64). `sqnorm`: total_sqnorm(gs) when the caller has it already."""
    total_norm = (total_sqnorm(gs) if sqnorm is None else sqnorm).sqrt()
    clip_scale_(gs, total_norm, max_norm)
    return total_norm.reshape(())


# -- weight averaging (SWA running mean, EMA) --------------------------------------------------------
def average_torch_(avg: Tensor, w: Tensor, count: Tensor, decay: float | None) -> None:
    """Twin of kernels.average_: avg <- lerp(avg, w, weight) in fp32; the first update copies w.

    weight = 1 / (count + 1) (running mean) or 1 - decay (EMA); count is () or (1,) int64, on device.
    """
    count = count.reshape(())
    weight = torch.full((), 1.0 - decay, device=avg.device) if decay is not None else 1.0 / (count.float() + 1.0)
    weight = torch.where(count == 0, torch.ones_like(weight), weight)  # () on the device: no host sync
    if avg.dtype == torch.float32 and w.dtype == torch.float32:
        # in place, one pass; torch.lerp computes end - (end - start) * (1 - weight) for weight >= 0.5,
        # so weight 1 (the first update) gives w exactly when avg is finite
        avg.lerp_(w, weight)
    else:
        avg.copy_(torch.lerp(avg.float(), w.float(), weight))


def average_(avgs: list[Tensor], ws: list[Tensor], count: Tensor, decay: float | None = None) -> None:
    """Fold each w into its average, in place: running mean (decay None) or EMA.

    `count` is the number of models averaged so far, a device tensor read without a host sync; the
    caller adds 1 to it after every vector of the update is done.
    """
    for avg, w in zip(avgs, ws):
        if use_triton(avg):
            triton_kernels().average_(avg, w, count.to(avg.device), decay)
        else:
            average_torch_(avg, w, count.to(avg.device), decay)


# -- points on a curve through weight space ----------------------------------------------------------
def combine3_torch_(out: Tensor, x: Tensor, y: Tensor, z: Tensor, a: float, b: float, c: float) -> None:
    """Twin of kernels.combine3_: out <- (a x + b y) + c z, computed in fp32 (fp64 for fp64)."""
    dtype = math_dtype(out)
    out.copy_((x.to(dtype) * a + y.to(dtype) * b) + z.to(dtype) * c)


def combine3_(outs: list[Tensor], xs: list[Tensor], ys: list[Tensor], zs: list[Tensor],
              a: float, b: float, c: float) -> None:
    """Each out <- a x + b y + c z (a curve's phi(t) from its end points and bend). Where only one
    coefficient is non-zero and it is 1, the vector is copied, so a curve's ends are bit-exact."""
    for out, x, y, z in zip(outs, xs, ys, zs):
        terms = [(coef, v) for coef, v in ((a, x), (b, y), (c, z)) if coef != 0.0]
        if len(terms) == 1 and terms[0][0] == 1.0:
            out.copy_(terms[0][1])
        elif use_triton(out):
            triton_kernels().combine3_(out, x, y, z, a, b, c)
        else:
            combine3_torch_(out, x, y, z, a, b, c)
