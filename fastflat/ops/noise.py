"""Evolution-strategy noise regenerated from (seed, member, offset), never stored as a K x N matrix.

    eps_k = fastflat.member_noise(seed, k, n)            # (n,) N(0, 1); dist="uniform": U[-1, 1)
    perturb_into_(out, w, seed, k, sigma)                # out <- w + sigma * eps_k
    weighted_noise_sum_(w, seed, members, coeffs, lr)    # w <- w + lr * sum_j coeffs[j] eps_{members[j]}

Contract between the Triton kernels (fastflat/kernels/noise.py, key layout there) and the torch twins
here: Philox words and uniform noise are bitwise equal; Gaussian noise agrees to a few fp32 ulps (log,
sqrt, cos differ between libdevice and torch); the fused updates to an ulp of w (a GPU may fuse a*b+c).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastflat.ops import triton_kernels, use_triton

DISTS = ("normal", "uniform")
MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3").
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # multipliers of c0 and c2
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of k0 and k1
UNIFORM_SCALE = 4.6566127342e-10  # triton's uint_to_uniform_float: (2^31 - 1) * scale < 1 in fp32


# -- Philox4x32-10 in int64 torch arithmetic ---------------------------------------------------------
def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for a < 2^32 and b in [0, 2^32).

    The 64-bit product overflows int64, so b is split into 16-bit halves: every partial product < 2^48.
    """
    p_lo, p_hi = a * (b & 0xFFFF), a * (b >> 16)  # a * b = p_hi * 2^16 + p_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32_torch(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int, rounds: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 on int64 counters in [0, 2^32), key (k0, k1); the round order of tl.philox."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_words_torch(seed: int, member: int | Tensor, n: int, device="cpu") -> Tensor:
    """(2, n) int64: the words x0, x1 behind eps_member[0:n]; counter (offset, member, 0, 0)."""
    offsets = torch.arange(n, dtype=torch.int64, device=device)
    c1 = (torch.as_tensor(member, device=device).to(torch.int64) & MASK32).expand(n)
    zero = torch.zeros_like(offsets)
    x0, x1, _, _ = philox4x32_torch(offsets, c1, zero, zero, seed & MASK32, seed >> 32)
    return torch.stack([x0, x1])


def _uniform01(x: Tensor) -> Tensor:
    """[0, 1) fp32 from uint32 words, as tl.uint_to_uniform_float: fold the int32 sign, then scale."""
    folded = torch.where(x >= 2**31, MASK32 - x, x)  # ~x of the negative int32, in [0, 2^31)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def _noise_torch(seed: int, member: int | Tensor, n: int, dist: str, device) -> Tensor:
    """(n,) fp32 eps_member; a 0-d member tensor stays on the device (no host synchronisation)."""
    x0, x1 = philox_words_torch(seed, member, n, device)
    u0 = _uniform01(x0)
    if dist == "uniform":
        return 2.0 * u0 - 1.0
    # Box-Muller (first value), as tl.pair_uniform_to_normal: the clamp keeps log finite.
    r = torch.sqrt(-2.0 * torch.log(u0.clamp(min=1e-7)))
    return r * torch.cos(6.283185307179586 * _uniform01(x1))


# -- checks ------------------------------------------------------------------------------------------
def _check(seed: int, dist: str, member: int | None = None) -> None:
    if dist not in DISTS:
        raise ValueError(f"unknown noise distribution {dist!r}: use one of {', '.join(DISTS)}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed {seed} must be in [0, 2^63)")
    if member is not None and not 0 <= member < 2**32:
        raise ValueError(f"member {member} must be in [0, 2^32)")


# -- the noise of one member -------------------------------------------------------------------------
def member_noise_torch(seed: int, member: int, n: int, dist: str = "normal", device="cpu",
                       dtype=torch.float32) -> Tensor:
    """Twin of member_noise."""
    _check(seed, dist, member)
    return _noise_torch(seed, member, n, dist, device).to(dtype)


def member_noise(seed: int, member: int, n: int, dist: str = "normal", device="cpu",
                 dtype=torch.float32) -> Tensor:
    """(n,) eps_member: N(0, 1) or U[-1, 1), the same numbers the fused ops below regenerate."""
    _check(seed, dist, member)
    out = torch.empty(n, dtype=dtype, device=device)
    if use_triton(out):
        triton_kernels().perturb_into_(out, None, seed, member, 1.0, dist)
        return out
    return out.copy_(_noise_torch(seed, member, n, dist, device))


# -- out <- w + sign * sigma * eps_k -----------------------------------------------------------------
def perturb_into_torch_(out: Tensor, w: Tensor, seed: int, member: int, sigma: float, dist: str,
                        sign: int = 1) -> None:
    """Twin of perturb_into_."""
    eps = _noise_torch(seed, member, w.numel(), dist, w.device)
    out.copy_(w.float() + (sign * sigma) * eps)


def perturb_into_(out: Tensor, w: Tensor, seed: int, member: int, sigma: float, dist: str = "normal",
                  sign: int = 1) -> None:
    """ES member weights out <- w + sign * sigma * eps_member; sign=-1 is the antithetic twin.

    (n,) contiguous on one device; out may be w itself.
    """
    _check(seed, dist, member)
    if use_triton(w):
        triton_kernels().perturb_into_(out, w, seed, member, sign * sigma, dist)
    else:
        perturb_into_torch_(out, w, seed, member, sigma, dist, sign)


# -- w <- w + alpha * sum_k coeffs[k] * eps_{members[k]} ---------------------------------------------
def weighted_noise_sum_torch_(w: Tensor, seed: int, members: Tensor, coeffs: Tensor, alpha: float,
                              dist: str) -> None:
    """Twin of weighted_noise_sum_: one eps at a time, so memory stays O(n) whatever K."""
    acc = torch.zeros(w.numel(), dtype=torch.float32, device=w.device)  # (n,) fp32
    for k in range(members.numel()):
        acc += coeffs[k] * _noise_torch(seed, members[k], w.numel(), dist, w.device)
    w.copy_(w.float() + alpha * acc)


def weighted_noise_sum_(w: Tensor, seed: int, members: Tensor, coeffs: Tensor, alpha: float,
                        dist: str = "normal") -> None:
    """The ES update w <- w + alpha * sum_k coeffs[k] * eps_{members[k]}, noise regenerated in place.

    members: (K,) int ids in [0, 2^32); coeffs: (K,) fp32 (fitness weights); both on w's device, read
    there, so nothing waits on the host. An antithetic pair is the same member twice with +c and -c:
    it cancels exactly on the twin, to an ulp of c * eps on a GPU (fused multiply-add).
    """
    _check(seed, dist)
    if members.shape != coeffs.shape or members.dim() != 1:
        raise ValueError(
            f"members {tuple(members.shape)} and coeffs {tuple(coeffs.shape)}: want (K,) each")
    if members.is_floating_point() or coeffs.dtype != torch.float32:
        raise ValueError(f"members must be integer and coeffs fp32, got {members.dtype}, {coeffs.dtype}")
    if members.device != w.device or coeffs.device != w.device:
        raise ValueError(
            f"members ({members.device}) and coeffs ({coeffs.device}) must be on {w.device}")
    if members.numel() == 0:
        return
    if use_triton(w):
        triton_kernels().weighted_noise_sum_(w, seed, members, coeffs, alpha, dist)
    else:
        weighted_noise_sum_torch_(w, seed, members, coeffs, alpha, dist)
