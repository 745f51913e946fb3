"""SAM's ascent step on a flat buffer, fused: save w, then w <- w + e(g), in one read of w and g.

    L2:    e = rho * g / (||g|| + eps)              adaptive (ASAM): e = rho * w^2 g / (||w g|| + eps)
    L-inf: e = rho * sign(g)                        adaptive:        e = rho * |w| sign(g)
    with a mask (SAM-ON, ESAM's stochastic weights): e *= mask, the norm then over mask * g

(Foret et al. 2021, "Sharpness-Aware Minimization"; Kwon et al. 2021, "ASAM", with T_w = |w|.)
The norm arrives as a device pointer, so nothing waits on the host. The restore is `w.copy_(backup)`:
bit-exact, never `w - e` in low precision.
"""

import torch
import triton
import triton.language as tl

BLOCK = 2048

L2, LINF = 0, 1  # values of the NORM constexpr


@triton.jit
def _sam_perturb_kernel(
    W_PTR,  # (n,) params, updated in place to w + e
    G_PTR,  # (n,) gradient at w
    BACKUP_PTR,  # (n,) out: exact copy of w before the step
    SQNORM_PTR,  # (1,) fp32: ||g||^2 (or ||w g||^2 when ADAPTIVE); read only when NORM == L2
    MASK_PTR,  # (n,) 0/1 per weight: which ones move (read only when HAS_MASK)
    rho,  # float: radius of the ball
    eps,  # float: keeps the scale finite when g == 0
    n,
    NORM: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    w_raw = tl.load(W_PTR + offsets, mask=mask, other=0.0)
    tl.store(BACKUP_PTR + offsets, w_raw, mask=mask)  # raw bits: the restore is exact
    w = w_raw.to(tl.float32)
    g = tl.load(G_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    if NORM == 0:
        e = g * (rho / (tl.sqrt(tl.load(SQNORM_PTR)) + eps))
        if ADAPTIVE:
            e = e * w * w
    else:
        e = rho * tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        if ADAPTIVE:
            e = e * tl.abs(w)
    if HAS_MASK:
        e = e * tl.load(MASK_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(W_PTR + offsets, (w + e).to(w_raw.dtype), mask=mask)


def sam_perturb_(
    w: torch.Tensor,
    g: torch.Tensor,
    backup: torch.Tensor,
    sqnorm: torch.Tensor | None,
    rho: float,
    norm: str = "l2",
    adaptive: bool = False,
    eps: float = 1e-12,
    weight_mask: torch.Tensor | None = None,
) -> None:
    """In place: backup <- w; w <- w + e (times weight_mask where given). All (n,) contiguous on one
    device; sqnorm (1,) fp32 for L2."""
    n = w.numel()
    grid = (max(triton.cdiv(n, BLOCK), 1),)
    mode = L2 if norm == "l2" else LINF
    _sam_perturb_kernel[grid](
        w, g, backup, sqnorm if sqnorm is not None else g, weight_mask if weight_mask is not None else g, rho, eps, n,
        NORM=mode, ADAPTIVE=adaptive, HAS_MASK=weight_mask is not None, BLOCK=BLOCK,
    )
