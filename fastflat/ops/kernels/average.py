"""Weight averaging on a flat buffer, fused: one read of the average, one of the weights, one write.

    running mean (SWA, Izmailov et al. 2018):  avg <- avg + (w - avg) / (count + 1)
    EMA with decay d:                          avg <- avg + (1 - d) * (w - avg)

`count` (models averaged so far) is read from a device pointer, so an update never waits on the host;
the first update (count == 0) copies w exactly, as torch.optim.swa_utils.AveragedModel does. The
caller adds 1 to count once every buffer is updated.
"""

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _average_kernel(
    AVG_PTR,  # (n,) running average, updated in place
    W_PTR,  # (n,) current weights, any float dtype
    COUNT_PTR,  # (1,) int64: number of models averaged so far
    decay,  # float: EMA decay, read only when EMA
    n,
    EMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    count = tl.load(COUNT_PTR).to(tl.float32)
    if EMA:
        weight = 1.0 - decay
    else:
        weight = 1.0 / (count + 1.0)
    avg_raw = tl.load(AVG_PTR + offsets, mask=mask, other=0.0)
    avg = avg_raw.to(tl.float32)
    w = tl.load(W_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    mixed = avg + weight * (w - avg)
    tl.store(AVG_PTR + offsets, tl.where(count == 0.0, w, mixed).to(avg_raw.dtype), mask=mask)


def average_(avg: torch.Tensor, w: torch.Tensor, count: torch.Tensor, decay: float | None) -> None:
    """In place on a contiguous (n,) avg; w (n,) contiguous on its device; count () or (1,) int64 there.

    decay=None: running mean; otherwise EMA with that decay.
    """
    n = avg.numel()
    _average_kernel[(max(triton.cdiv(n, BLOCK), 1),)](
        avg, w, count, 0.0 if decay is None else decay, n, EMA=decay is not None, BLOCK=BLOCK
    )
