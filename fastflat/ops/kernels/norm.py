"""Deterministic two-stage squared L2 norm in fp32: per-block partial sums, then one program adds them.

No atomics, so the same input gives the same bits on every call; the result stays on the device
(shape (1,) fp32) so callers can feed it to the next kernel without a host synchronisation.
"""

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program in stage 1; 2^28 elements -> 65,536 partials
FINAL_BLOCK = 1024  # partials summed per loop iteration in stage 2


@triton.jit
def _partial_sqnorm_kernel(
    X_PTR,  # (n,) values, any float dtype
    SCALE_PTR,  # (n,) elementwise scale |s| applied before squaring (ASAM's |w|), if HAS_SCALE
    PARTIAL_PTR,  # (n_programs,) fp32 out: sum over this program's block of (|s| * x)^2
    n,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(X_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x = x * tl.abs(tl.load(SCALE_PTR + offsets, mask=mask, other=0.0).to(tl.float32))
    tl.store(PARTIAL_PTR + pid, tl.sum(x * x, axis=0))


@triton.jit
def sum_partials_kernel(
    PARTIAL_PTR,  # (n_partials,) fp32
    OUT_PTR,  # (1,) fp32 out
    n_partials,
    FINAL_BLOCK: tl.constexpr,
):
    # One program walks the partials in a fixed order: deterministic, and cheap (n / BLOCK values).
    acc = tl.zeros([FINAL_BLOCK], dtype=tl.float32)
    for start in range(0, n_partials, FINAL_BLOCK):
        offsets = start + tl.arange(0, FINAL_BLOCK)
        acc += tl.load(PARTIAL_PTR + offsets, mask=offsets < n_partials, other=0.0)
    tl.store(OUT_PTR, tl.sum(acc, axis=0))


def sqnorm(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """sum((|scale| * x)^2) over a contiguous 1-D tensor, as a (1,) fp32 tensor on x's device."""
    n = x.numel()
    n_programs = max(triton.cdiv(n, BLOCK), 1)
    partials = torch.empty(n_programs, dtype=torch.float32, device=x.device)
    out = torch.empty(1, dtype=torch.float32, device=x.device)
    _partial_sqnorm_kernel[(n_programs,)](
        x, scale if scale is not None else x, partials, n, HAS_SCALE=scale is not None, BLOCK=BLOCK
    )
    sum_partials_kernel[(1,)](partials, out, n_programs, FINAL_BLOCK=FINAL_BLOCK)
    return out
