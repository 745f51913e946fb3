"""A point on a curve through weight space: out <- a * x + b * y + c * z, in fp32, one pass.

A mode-connecting curve writes phi(t) = a(t) w1 + b(t) theta + c(t) w2 into the model's flat buffer
every step; fused, that is one read of each vector and one write, whatever the model.
"""

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _combine3_kernel(
    OUT_PTR,  # (n,) written
    X_PTR,  # (n,)
    Y_PTR,  # (n,)
    Z_PTR,  # (n,)
    a,  # float coefficients
    b,
    c,
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(X_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    out = (a * x + b * y) + c * z  # the twin's order of operations
    tl.store(OUT_PTR + offsets, out.to(OUT_PTR.dtype.element_ty), mask=mask)


def combine3_(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
              a: float, b: float, c: float) -> None:
    """out <- a x + b y + c z; all contiguous (n,) on one device, out may alias none of the inputs."""
    n = out.numel()
    _combine3_kernel[(max(triton.cdiv(n, BLOCK), 1),)](out, x, y, z, float(a), float(b), float(c), n, BLOCK=BLOCK)
