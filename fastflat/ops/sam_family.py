"""Flat-vector ops of the SAM variants (methods/sam_steps.py, optim/sam_family.py): torch twins routed to
the Triton kernels in kernels/sam_family.py, as every op in fastflat.ops.

    total_dot(xs, ys)                  sum over vectors of x . y, (1,) fp32 (fp64 for fp64) on the device
    axpby_(outs, xs, ys, a, b)         out <- a x + b y, a and b floats or (1,) device tensors
    fsam_direction_(gs, ms, sigma, l)  Friendly SAM: g <- g - sigma m; m <- l m + (1 - l) g
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastflat.ops import math_dtype, triton_kernels, use_triton


def dot_torch(x: Tensor, y: Tensor) -> Tensor:
    """Twin of kernels.dot: sum(x * y) in fp32 (fp64 for fp64), shape (1,)."""
    dtype = math_dtype(x)
    return torch.dot(x.to(dtype), y.to(dtype)).reshape(1)


def total_dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """x . y summed over the vector pairs, (1,) on the first vector's device."""
    parts = [(triton_kernels().dot(x, y) if use_triton(x) else dot_torch(x, y)).to(xs[0].device) for x, y in zip(xs, ys)]
    if len(parts) == 1:
        return parts[0]
    widest = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    return torch.stack([p.to(widest) for p in parts]).sum(0)


def _coefficient(c: float | Tensor, like: Tensor) -> Tensor:
    """A (1,) coefficient in the math dtype of `like`, on its device (a float becomes a tensor: no sync)."""
    if isinstance(c, Tensor):
        return c.reshape(1).to(like.device, math_dtype(like))
    return torch.full((1,), float(c), device=like.device, dtype=math_dtype(like))


def axpby_torch_(out: Tensor, x: Tensor, y: Tensor, a: Tensor, b: Tensor) -> None:
    """Twin of kernels.axpby_: out <- a x + b y, computed in fp32 (fp64 for fp64)."""
    dtype = math_dtype(out)
    out.copy_(a.to(dtype) * x.to(dtype) + b.to(dtype) * y.to(dtype))


def axpby_(outs: list[Tensor], xs: list[Tensor], ys: list[Tensor], a: float | Tensor, b: float | Tensor) -> None:
    """Each out <- a x + b y (out may be x or y). a, b: floats, or (1,) tensors computed on the device."""
    for out, x, y in zip(outs, xs, ys):
        ca, cb = _coefficient(a, out), _coefficient(b, out)
        if use_triton(out):
            triton_kernels().axpby_(out, x, y, ca.float(), cb.float())
        else:
            axpby_torch_(out, x, y, ca, cb)


def fsam_direction_torch_(g: Tensor, m: Tensor, sigma: float, lmbda: float) -> None:
    """Twin of kernels.fsam_direction_."""
    dtype = math_dtype(g)
    g32, m32 = g.to(dtype), m.to(dtype)
    direction = g32 - sigma * m32
    m.copy_(lmbda * m32 + (1.0 - lmbda) * g32)
    g.copy_(direction)


def fsam_direction_(gs: list[Tensor], ms: list[Tensor], sigma: float, lmbda: float) -> None:
    """Friendly SAM's ascent direction, in place: g <- g - sigma m with the EMA m of earlier steps,
    then m <- lmbda m + (1 - lmbda) g with this step's g (Li et al. 2024; the authors' order)."""
    for g, m in zip(gs, ms):
        if use_triton(g):
            triton_kernels().fsam_direction_(g, m, sigma, lmbda)
        else:
            fsam_direction_torch_(g, m, sigma, lmbda)
