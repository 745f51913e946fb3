"""Global-norm clipping's scale step: g <- g * min(1, max_norm / (||g|| + 1e-6)), torch's formula.

The total norm is read from a device pointer and the branch is taken on the device: when no clipping
is needed the kernel writes nothing, and the host never waits for the norm.
"""

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _clip_scale_kernel(
    G_PTR,  # (n,) gradient, scaled in place
    TOTAL_NORM_PTR,  # (1,) fp32: the global norm over every buffer being clipped
    max_norm,  # float
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    coef = max_norm / (tl.load(TOTAL_NORM_PTR) + 1e-6)
    if coef < 1.0:
        g = tl.load(G_PTR + offsets, mask=mask, other=0.0)
        tl.store(G_PTR + offsets, (g.to(tl.float32) * coef).to(g.dtype), mask=mask)


def clip_scale_(g: torch.Tensor, total_norm: torch.Tensor, max_norm: float) -> None:
    """In place on a contiguous (n,) gradient; total_norm is (1,) or () fp32 on g's device."""
    n = g.numel()
    _clip_scale_kernel[(max(triton.cdiv(n, BLOCK), 1),)](g, total_norm, max_norm, n, BLOCK=BLOCK)
