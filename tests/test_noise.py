"""ES noise: eps_k is a pure function of (seed, k, offset); the Triton kernels (interpreted on CPU)
agree with the torch twins: Philox words and uniforms bitwise, normals to a few fp32 ulps.
"""

import pytest
import torch

import fastflat
from fastflat.ops import kernels
from fastflat.ops import noise

SIZES = [1, 7, 1023, 1025]
DISTS = ["normal", "uniform"]
SEEDS = [0, 1, 2**31 + 5, 2**40 + 3]  # int32, a specialised 1, int64, and a key with k1 != 0
ULP32 = torch.finfo(torch.float32).eps


def _vec(n, dtype, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_same_noise(kernel_eps, twin_eps, dist):
    """The contract: uniform bitwise equal; normal within 4 ulps of max(|eps|, 1) (transcendentals)."""
    if dist == "uniform":
        assert torch.equal(kernel_eps, twin_eps)
    else:
        torch.testing.assert_close(kernel_eps, twin_eps, rtol=4 * ULP32, atol=4 * ULP32)


def assert_same_storage_rounding(kernel_out, twin_out):
    """Equal bits, except that the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even)."""
    if kernel_out.dtype == torch.bfloat16:
        tol = torch.finfo(torch.bfloat16).eps * twin_out.float().abs().max().item()
        torch.testing.assert_close(kernel_out.float(), twin_out.float(), rtol=0, atol=tol)
    else:
        assert torch.equal(kernel_out, twin_out)


# -- the generator -----------------------------------------------------------------------------------
def test_twin_philox_matches_the_random123_known_answers():
    zero, ones = torch.zeros(1, dtype=torch.int64), torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    got_zero = noise.philox4x32_torch(zero, zero, zero, zero, 0, 0)
    got_ones = noise.philox4x32_torch(ones, ones, ones, ones, 0xFFFFFFFF, 0xFFFFFFFF)
    assert [int(x) for x in got_zero] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(x) for x in got_ones] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_kernel_philox_words_equal_twin_bitwise(n, seed):
    for member in (0, 3, 2**32 - 1):
        assert torch.equal(kernels.philox_words(seed, member, n, "cpu"),
                           noise.philox_words_torch(seed, member, n))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dist", DISTS)
def test_kernel_noise_matches_twin(n, dist, triton_backend):
    for seed in SEEDS:
        kernel_eps = fastflat.member_noise(seed, 5, n, dist)
        assert_same_noise(kernel_eps, noise.member_noise_torch(seed, 5, n, dist), dist)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_noise_is_the_fp32_noise_rounded(dtype, triton_backend):
    uniform32 = noise.member_noise_torch(3, 1, 1025, "uniform")
    assert torch.equal(noise.member_noise_torch(3, 1, 1025, "uniform", dtype=dtype), uniform32.to(dtype))
    kernel_eps = fastflat.member_noise(3, 1, 1025, "uniform", dtype=dtype)
    assert_same_storage_rounding(kernel_eps, uniform32.to(dtype))


# -- properties of the noise (torch twin, n = 100k) --------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_same_key_regenerates_the_same_bits(backend, monkeypatch):
    monkeypatch.setenv("FASTFLAT_BACKEND", backend)
    for dist in DISTS:
        first, again = fastflat.member_noise(9, 4, 1025, dist), fastflat.member_noise(9, 4, 1025, dist)
        assert torch.equal(first, again)


def test_another_member_or_seed_gives_other_noise():
    eps = noise.member_noise_torch(9, 4, 10_000)
    for other in (noise.member_noise_torch(9, 5, 10_000), noise.member_noise_torch(10, 4, 10_000)):
        assert (eps != other).float().mean() > 0.999
        assert torch.corrcoef(torch.stack([eps, other]))[0, 1].abs() < 0.05


def test_normal_noise_has_zero_mean_and_unit_std():
    eps = noise.member_noise_torch(123, 7, 100_000, "normal")
    assert eps.mean().abs() < 0.02  # 5 standard errors
    assert (eps.std() - 1.0).abs() < 0.02
    assert (eps.abs() < 1.0).float().mean().sub(0.6827).abs() < 0.01  # the 68% rule: not merely scaled


def test_uniform_noise_fills_minus_one_to_one():
    eps = noise.member_noise_torch(123, 7, 100_000, "uniform")
    assert eps.min() >= -1.0 and eps.max() <= 1.0
    assert eps.min() < -0.999 and eps.max() > 0.999
    assert eps.mean().abs() < 0.01 and (eps.var() - 1 / 3).abs() < 0.01


def test_normal_noise_is_independent_of_the_uniform_one():
    # Same counter, but the Gaussian is not a monotone function of the uniform (Box-Muller mixes x1 in).
    n = noise.member_noise_torch(1, 1, 10_000, "normal")
    u = noise.member_noise_torch(1, 1, 10_000, "uniform")
    assert torch.corrcoef(torch.stack([n, u]))[0, 1].abs() < 0.05


# -- perturb_into_ -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("sign", [1, -1])
def test_perturb_into_is_w_plus_sign_sigma_eps(backend, n, dist, sign, monkeypatch):
    monkeypatch.setenv("FASTFLAT_BACKEND", backend)
    w, out = _vec(n, torch.float32, 0), torch.empty(n)
    noise.perturb_into_(out, w, 11, 2, 0.05, dist, sign=sign)
    expected = w.double() + sign * 0.05 * fastflat.member_noise(11, 2, n, dist).double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=ULP32 * expected.abs().max())


def test_perturb_into_may_write_over_w(triton_backend):
    w = _vec(1025, torch.float32, 1)
    expected = torch.empty_like(w)
    noise.perturb_into_(expected, w, 11, 2, 0.05, "uniform")
    noise.perturb_into_(w, w, 11, 2, 0.05, "uniform")
    assert torch.equal(w, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_perturb_into_kernel_matches_twin_in_low_precision(dtype):
    w = _vec(1025, dtype, 2)
    out_kernel, out_twin = torch.empty_like(w), torch.empty_like(w)
    kernels.perturb_into_(out_kernel, w, 11, 2, 0.05, "uniform")
    noise.perturb_into_torch_(out_twin, w, 11, 2, 0.05, "uniform")
    assert_same_storage_rounding(out_kernel, out_twin)  # same fp32 value, same rounding to storage


# -- weighted_noise_sum_ -----------------------------------------------------------------------------
def _explicit_sum(w, members, coeffs, alpha, dist):
    """fp64 w + alpha * sum_k coeffs[k] * eps_k over materialised eps (the K x N the op never builds)."""
    eps = torch.stack([noise.member_noise_torch(21, int(m), w.numel(), dist) for m in members])
    return w.double() + alpha * (coeffs.double()[:, None] * eps.double()).sum(0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("member_dtype", [torch.int64, torch.int32])
def test_weighted_noise_sum_equals_the_explicit_sum(backend, n, dist, member_dtype, monkeypatch):
    monkeypatch.setenv("FASTFLAT_BACKEND", backend)
    w = _vec(n, torch.float32, 3)
    members = torch.tensor([0, 4, 1, 9, 2**31 - 1], dtype=member_dtype)
    coeffs = torch.tensor([0.5, -1.25, 2.0, 0.125, -0.75])
    expected = _explicit_sum(w, members, coeffs, 0.01, dist)
    noise.weighted_noise_sum_(w, 21, members, coeffs, 0.01, dist)
    torch.testing.assert_close(w.double(), expected, rtol=0, atol=4 * ULP32 * expected.abs().max())


@pytest.mark.parametrize("dist", DISTS)
def test_antithetic_pair_cancels_exactly_on_the_twin(dist, torch_backend):
    w = _vec(1025, torch.float32, 4)
    before = w.clone()
    noise.weighted_noise_sum_(w, 21, torch.tensor([6, 6]), torch.tensor([0.3, -0.3]), 1.0, dist)
    assert torch.equal(w, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weighted_noise_sum_kernel_matches_twin_in_low_precision(dtype):
    w = _vec(1025, dtype, 5)
    members, coeffs = torch.tensor([1, 2, 3]), torch.tensor([1.0, -2.0, 0.5])
    w_kernel, w_twin = w.clone(), w.clone()
    kernels.weighted_noise_sum_(w_kernel, 21, members, coeffs, 0.1, "uniform")
    noise.weighted_noise_sum_torch_(w_twin, 21, members, coeffs, 0.1, "uniform")
    assert_same_storage_rounding(w_kernel, w_twin)


def test_weighted_noise_sum_with_no_members_leaves_w_alone(triton_backend):
    w = _vec(7, torch.float32, 6)
    before = w.clone()
    noise.weighted_noise_sum_(w, 21, torch.tensor([], dtype=torch.int64), torch.tensor([]), 1.0)
    assert torch.equal(w, before)


# -- argument checks ---------------------------------------------------------------------------------
def test_unknown_distribution_is_rejected():
    with pytest.raises(ValueError, match="laplace"):
        fastflat.member_noise(0, 0, 7, "laplace")


@pytest.mark.parametrize("seed, member", [(-1, 0), (2**63, 0), (0, -1), (0, 2**32)])
def test_out_of_range_keys_are_rejected(seed, member):
    with pytest.raises(ValueError, match="must be in"):
        fastflat.member_noise(seed, member, 7)


def test_weighted_noise_sum_rejects_mismatched_members_and_coeffs():
    with pytest.raises(ValueError, match="want \\(K,\\)"):
        noise.weighted_noise_sum_(torch.zeros(7), 0, torch.tensor([1, 2]), torch.tensor([1.0]), 1.0)
    with pytest.raises(ValueError, match="fp32"):
        coeffs64 = torch.tensor([1.0], dtype=torch.float64)
        noise.weighted_noise_sum_(torch.zeros(7), 0, torch.tensor([1]), coeffs64, 1.0)
