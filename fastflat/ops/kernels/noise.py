"""Counter-based ES noise: eps_k[i] is a pure function of (seed, member k, offset i), never stored.

Philox4x32-10 (`tl.philox`), key (k0, k1) = (seed & 0xffffffff, seed >> 32), i.e. the 32-bit key is
the seed for seeds below 2^32; counter (c0, c1, c2, c3) = (offset i, member k, 0, 0). Of the four
output words only x0 (uniform) or x0, x1 (normal, first Box-Muller value) are used: one Philox call
per element. Offsets are int32, so a vector holds fewer than 2^31 elements; members are in [0, 2^32).
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024

NORMAL, UNIFORM = 0, 1  # values of the DIST constexpr
DIST_CODES = {"normal": NORMAL, "uniform": UNIFORM}
MAX_N = 2**31 - 1  # offsets are int32


@triton.jit
def _philox_words(seed, offsets, member):
    """The two Philox words element `offsets` of member `member` uses, each a (BLOCK,) uint32 block."""
    zero = offsets.to(tl.uint32) * 0
    c1 = zero + member.to(tl.uint32)  # the member, broadcast over the block
    x0, x1, _, _ = tl.philox(seed, offsets.to(tl.uint32), c1, zero, zero)
    return x0, x1


@triton.jit
def _noise(seed, offsets, member, DIST: tl.constexpr):
    """(BLOCK,) fp32 eps: N(0, 1) via Box-Muller on (x0, x1), or U[-1, 1) as 2 * u(x0) - 1."""
    x0, x1 = _philox_words(seed, offsets, member)
    u0 = tl.uint_to_uniform_float(x0)  # [0, 1)
    if DIST == 0:
        eps, _ = tl.pair_uniform_to_normal(u0, tl.uint_to_uniform_float(x1))
    else:
        eps = 2.0 * u0 - 1.0  # 2 * u is exact, so one rounding with or without an FMA
    return eps


@triton.jit
def _philox_words_kernel(
    WORDS_PTR,  # (2, n) int64 out: the words x0, x1 as values in [0, 2^32)
    seed,  # int: the Philox key
    member,  # int: counter word c1
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x0, x1 = _philox_words(seed, offsets, tl.to_tensor(member))
    tl.store(WORDS_PTR + offsets, x0.to(tl.int64), mask=mask)
    tl.store(WORDS_PTR + n + offsets, x1.to(tl.int64), mask=mask)


@triton.jit
def _perturb_kernel(
    OUT_PTR,  # (n,) out: w + scale * eps_k (or scale * eps_k without w); may alias W_PTR
    W_PTR,  # (n,) weights, read only when HAS_W
    seed,  # int: the Philox key
    member,  # int: k, counter word c1
    scale,  # float: sign * sigma
    n,
    HAS_W: tl.constexpr,
    DIST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    out = scale * _noise(seed, offsets, tl.to_tensor(member), DIST)
    if HAS_W:
        out += tl.load(W_PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT_PTR + offsets, out.to(OUT_PTR.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_noise_sum_kernel(
    W_PTR,  # (n,) weights, updated in place
    MEMBERS_PTR,  # (K,) int: member ids k, counter word c1
    COEFFS_PTR,  # (K,) fp32: coefficient of each member's noise
    seed,  # int: the Philox key
    alpha,  # float: step applied to the whole sum
    n,
    K,  # number of members
    DIST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    # Every eps_k is regenerated here, block by block: memory O(n) whatever K, and one pass over w.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(K):
        member = tl.load(MEMBERS_PTR + k)
        acc += tl.load(COEFFS_PTR + k) * _noise(seed, offsets, member, DIST)
    w_raw = tl.load(W_PTR + offsets, mask=mask, other=0.0)
    tl.store(W_PTR + offsets, (w_raw.to(tl.float32) + alpha * acc).to(w_raw.dtype), mask=mask)


def _grid(n: int) -> tuple[int]:
    if n > MAX_N:
        raise ValueError(f"{n} elements: noise offsets are int32, at most {MAX_N}")
    return (max(triton.cdiv(n, BLOCK), 1),)


def philox_words(seed: int, member: int, n: int, device) -> torch.Tensor:
    """(2, n) int64: the uint32 words x0, x1 behind eps_member[0:n] (for checking the generator)."""
    words = torch.empty(2, n, dtype=torch.int64, device=device)
    _philox_words_kernel[_grid(n)](words, seed, member, n, BLOCK=BLOCK)
    return words


def perturb_into_(
    out: torch.Tensor, w: torch.Tensor | None, seed: int, member: int, scale: float, dist: str,
) -> None:
    """out <- w + scale * eps_member (out <- scale * eps_member when w is None); (n,) contiguous."""
    n = out.numel()
    _perturb_kernel[_grid(n)](
        out, w if w is not None else out, seed, member, scale, n,
        HAS_W=w is not None, DIST=DIST_CODES[dist], BLOCK=BLOCK,
    )


def weighted_noise_sum_(
    w: torch.Tensor, seed: int, members: torch.Tensor, coeffs: torch.Tensor, alpha: float, dist: str,
) -> None:
    """w <- w + alpha * sum_k coeffs[k] * eps_{members[k]}, in place on a contiguous (n,) w.

    members (K,) int and coeffs (K,) fp32 live on w's device and are read there (no host sync).
    """
    n = w.numel()
    _weighted_noise_sum_kernel[_grid(n)](
        w, members.contiguous(), coeffs.contiguous(), seed, alpha, n, members.numel(),
        DIST=DIST_CODES[dist], BLOCK=BLOCK,
    )
