"""Every Triton kernel against its torch twin, on odd sizes and several dtypes.

Tolerance rule (flash-attention's): against an fp64 reference, the kernel may be at most twice as far
as the torch twin at the same dtype, plus one unit in the last place of that dtype.
"""

import pytest
import torch

from fastflat import ops

from fastflat.ops import kernels

SIZES = [1, 7, 1023, 1025, 4097, 9001]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _vec(n, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(device=device, dtype=dtype)


def assert_near_reference(kernel_out, twin_out, reference64):
    ulp = torch.finfo(kernel_out.dtype).eps * reference64.abs().max().clamp(min=1.0)
    kernel_err = (kernel_out.double() - reference64).abs().max()
    twin_err = (twin_out.double() - reference64).abs().max()
    assert kernel_err <= 2 * twin_err + ulp, f"kernel error {kernel_err:.3g} vs torch {twin_err:.3g}"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True])
def test_sqnorm_kernel_matches_fp64_sum(n, dtype, scaled, device):
    x, s = _vec(n, dtype, 0, device), _vec(n, dtype, 1, device)
    got = kernels.sqnorm(x, s if scaled else None)
    ref = ((x.double() * s.double().abs()) if scaled else x.double()).square().sum()
    assert got.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double()[0], ref, rtol=2e-6, atol=1e-30)


def test_sqnorm_kernel_is_deterministic(device):
    x = _vec(100_003, torch.float32, 2, device)
    assert torch.equal(kernels.sqnorm(x), kernels.sqnorm(x))


def test_sqnorm_kernel_many_partials_sums_all_of_them(device):
    # 2 * 4096 * 1024 + 5 elements -> more partials than one stage-2 block holds
    x = torch.ones(2 * 4096 * 1024 + 5, device=device)
    assert kernels.sqnorm(x).item() == float(x.numel())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturb_kernel_matches_twin(n, dtype, norm, adaptive, device):
    w, g = _vec(n, dtype, 3, device), _vec(n, dtype, 4, device)
    sq = ops.sqnorm_torch(g, w if adaptive else None) if norm == "l2" else None
    w_kernel, w_twin = w.clone(), w.clone()
    backup_kernel, backup_twin = torch.empty_like(w), torch.empty_like(w)
    kernels.sam_perturb_(w_kernel, g, backup_kernel, sq, 0.05, norm, adaptive)
    ops.sam_perturb_torch_(w_twin, g, backup_twin, sq, 0.05, norm, adaptive)

    w64, g64 = w.double(), g.double()
    if norm == "l2":
        e = 0.05 * g64 / (sq.double().sqrt() + 1e-12) * (w64 * w64 if adaptive else 1.0)
    else:
        e = 0.05 * torch.sign(g64) * (w64.abs() if adaptive else 1.0)
    assert torch.equal(backup_kernel, w), "backup must hold the exact bits of w"
    assert_near_reference(w_kernel, w_twin, w64 + e)


def test_sam_perturb_kernel_zero_gradient_stays_finite(device):
    w, g = _vec(1025, torch.float32, 5, device), torch.zeros(1025, device=device)
    backup = torch.empty_like(w)
    kernels.sam_perturb_(w, g, backup, ops.sqnorm_torch(g), 0.05, "l2", False)
    assert torch.equal(w, backup)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_kernel_matches_twin(n, dtype, max_norm, device):
    g = _vec(n, dtype, 6, device)
    total = ops.sqnorm_torch(g).sqrt()
    g_kernel, g_twin = g.clone(), g.clone()
    kernels.clip_scale_(g_kernel, total, max_norm)
    ops.clip_scale_torch_(g_twin, total, max_norm)
    coef = min(1.0, max_norm / (total.double().item() + 1e-6))
    assert_near_reference(g_kernel, g_twin, g.double() * coef)
    if max_norm == 1e6:
        assert torch.equal(g_kernel, g), "no clipping needed: the gradient must be untouched"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine3_kernel_matches_twin(n, dtype, device):
    x, y, z = (_vec(n, dtype, seed, device) for seed in (7, 8, 9))
    a, b, c = 0.49, 0.42, 0.09  # a Bezier curve's coefficients at t = 0.3
    out_kernel, out_twin = torch.empty_like(x), torch.empty_like(x)
    kernels.combine3_(out_kernel, x, y, z, a, b, c)
    ops.combine3_torch_(out_twin, x, y, z, a, b, c)
    assert_near_reference(out_kernel, out_twin, a * x.double() + b * y.double() + c * z.double())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("coefficients", [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)])
def test_combine3_copies_a_lone_unit_term_bit_for_bit(backend, coefficients, monkeypatch):
    monkeypatch.setenv("FASTFLAT_BACKEND", backend)
    x, y, z = (_vec(1025, torch.float32, seed, "cpu") for seed in (1, 2, 3))
    x[0], y[0], z[0] = -0.0, -0.0, -0.0  # a sum would turn -0.0 into +0.0
    out = torch.empty_like(x)
    ops.combine3_([out], [x], [y], [z], *coefficients)
    expected = (x, y, z)[coefficients.index(1.0)]
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_route_to_the_forced_backend(backend, monkeypatch):
    monkeypatch.setenv("FASTFLAT_BACKEND", backend)
    assert ops.use_triton(torch.zeros(1)) is (backend == "triton")


def test_ops_reject_an_unknown_backend(monkeypatch):
    monkeypatch.setenv("FASTFLAT_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTFLAT_BACKEND"):
        ops.use_triton(torch.zeros(1))
