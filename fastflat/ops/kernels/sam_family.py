"""The SAM variants' flat-buffer passes, fused: each is one read of its inputs and one write.

    axpby_:          out <- a * x + b * y, a and b (1,) fp32 on the device (computed from norms and dot
                     products there: GSAM's decomposition, LookSAM's orthogonal part and its reuse)
    fsam_direction_: g <- g - sigma * m;  m <- lmbda * m + (1 - lmbda) * g_old   (Friendly SAM, one pass)
    dot:             sum(x * y) over a vector, (1,) fp32, two deterministic stages like `sqnorm`

Coefficients arrive as device pointers, so nothing waits on the host between a reduction and its use.
"""

import torch
import triton
import triton.language as tl

from fastflat.ops.kernels.norm import BLOCK as DOT_BLOCK
from fastflat.ops.kernels.norm import FINAL_BLOCK, sum_partials_kernel

BLOCK = 2048


@triton.jit
def _axpby_kernel(
    OUT_PTR,  # (n,) written (may be X_PTR or Y_PTR: each element is read before it is written)
    X_PTR,  # (n,)
    Y_PTR,  # (n,)
    A_PTR,  # (1,) fp32
    B_PTR,  # (1,) fp32
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(X_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(A_PTR) * x + tl.load(B_PTR) * y  # the twin's order of operations
    tl.store(OUT_PTR + offsets, out.to(OUT_PTR.dtype.element_ty), mask=mask)


def axpby_(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out <- a x + b y; (n,) contiguous on one device, a and b (1,) fp32 there."""
    n = out.numel()
    _axpby_kernel[(max(triton.cdiv(n, BLOCK), 1),)](out, x, y, a, b, n, BLOCK=BLOCK)


@triton.jit
def _fsam_direction_kernel(
    G_PTR,  # (n,) in: gradient g; out: ascent direction g - sigma * m
    M_PTR,  # (n,) in/out: the gradients' EMA m, updated with this g
    sigma,  # float
    lmbda,  # float: EMA decay
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(G_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(G_PTR + offsets, (g - sigma * m).to(G_PTR.dtype.element_ty), mask=mask)
    tl.store(M_PTR + offsets, (lmbda * m + (1.0 - lmbda) * g).to(M_PTR.dtype.element_ty), mask=mask)


def fsam_direction_(g: torch.Tensor, m: torch.Tensor, sigma: float, lmbda: float) -> None:
    """In place: g <- g - sigma m (with m before this step), m <- lmbda m + (1 - lmbda) g."""
    n = g.numel()
    _fsam_direction_kernel[(max(triton.cdiv(n, BLOCK), 1),)](g, m, float(sigma), float(lmbda), n, BLOCK=BLOCK)


@triton.jit
def _partial_dot_kernel(
    X_PTR,  # (n,)
    Y_PTR,  # (n,)
    PARTIAL_PTR,  # (n_programs,) fp32 out: this block's sum of x * y
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(X_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(PARTIAL_PTR + pid, tl.sum(x * y, axis=0))


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum(x * y) over two contiguous 1-D tensors, a (1,) fp32 tensor on their device."""
    n = x.numel()
    n_programs = max(triton.cdiv(n, DOT_BLOCK), 1)
    partials = torch.empty(n_programs, dtype=torch.float32, device=x.device)
    out = torch.empty(1, dtype=torch.float32, device=x.device)
    _partial_dot_kernel[(n_programs,)](x, y, partials, n, BLOCK=DOT_BLOCK)
    sum_partials_kernel[(1,)](partials, out, n_programs, FINAL_BLOCK=FINAL_BLOCK)
    return out
