"""The SAM variants' kernels (ops/kernels/sam_family.py, and the weight mask of the SAM perturb kernel)
against their torch twins on odd sizes and three dtypes, with an fp64 reference (test_kernels.py's rule)."""

import pytest
import torch

from fastflat import ops
from fastflat.ops import kernels, sam_family
from test_kernels import DTYPES, SIZES, _vec, assert_near_reference


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_axpby_kernel_matches_twin(n, dtype, in_place, device):
    x, y = _vec(n, dtype, 11, device), _vec(n, dtype, 12, device)
    a = torch.tensor([1.37], device=device)
    b = torch.tensor([-0.4], device=device)
    out_kernel = x.clone() if in_place else torch.empty_like(x)
    out_twin = x.clone() if in_place else torch.empty_like(x)
    kernels.axpby_(out_kernel, out_kernel if in_place else x, y, a, b)  # GSAM writes g' in place
    sam_family.axpby_torch_(out_twin, out_twin if in_place else x, y, a, b)
    assert_near_reference(out_kernel, out_twin, 1.37 * x.double() - 0.4 * y.double())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fsam_direction_kernel_matches_twin(n, dtype, device):
    g, m = _vec(n, dtype, 13, device), _vec(n, dtype, 14, device)
    g_kernel, m_kernel, g_twin, m_twin = g.clone(), m.clone(), g.clone(), m.clone()
    kernels.fsam_direction_(g_kernel, m_kernel, 0.8, 0.9)
    sam_family.fsam_direction_torch_(g_twin, m_twin, 0.8, 0.9)
    assert_near_reference(g_kernel, g_twin, g.double() - 0.8 * m.double())
    assert_near_reference(m_kernel, m_twin, 0.9 * m.double() + 0.1 * g.double())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_kernel_matches_twin(n, dtype, device):
    x, y = _vec(n, dtype, 15, device), _vec(n, dtype, 16, device)
    got, twin = kernels.dot(x, y), sam_family.dot_torch(x, y)
    assert got.shape == (1,) and got.dtype == torch.float32
    reference = (x.double() * y.double()).sum()
    scale = (x.double().abs() * y.double().abs()).sum()  # a dot product's rounding scales with this, not with it
    assert (got.double() - reference).abs() <= 2 * (twin.double() - reference).abs() + 1e-6 * scale


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_sam_perturb_kernel_with_a_weight_mask_matches_twin(n, dtype, norm, device):
    w, g = _vec(n, dtype, 3, device), _vec(n, dtype, 4, device)
    mask = (_vec(n, torch.float32, 5, device) > 0).to(dtype)
    sq = ops.sqnorm_torch(g, mask) if norm == "l2" else None
    w_kernel, w_twin = w.clone(), w.clone()
    kernels.sam_perturb_(w_kernel, g, torch.empty_like(w), sq, 0.05, norm, False, weight_mask=mask)
    ops.sam_perturb_torch_(w_twin, g, torch.empty_like(w), sq, 0.05, norm, False, weight_mask=mask)
    g64, m64 = g.double(), mask.double()
    e = 0.05 * g64 / (sq.double().sqrt() + 1e-12) if norm == "l2" else 0.05 * torch.sign(g64)
    assert_near_reference(w_kernel, w_twin, w.double() + e * m64)
    assert torch.equal(w_kernel[mask == 0], w[mask == 0]), "masked-out weights must not move at all"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_ops_sum_dot_products_over_several_vectors(backend, monkeypatch):
    monkeypatch.setenv("FASTFLAT_BACKEND", backend)
    xs = [_vec(n, torch.float32, n, "cpu") for n in (7, 1025)]
    ys = [_vec(n, torch.float32, n + 1, "cpu") for n in (7, 1025)]
    expected = sum((x.double() * y.double()).sum() for x, y in zip(xs, ys))
    torch.testing.assert_close(sam_family.total_dot(xs, ys).double().item(), expected.item(), rtol=1e-5, atol=1e-5)
    outs = [torch.empty_like(x) for x in xs]
    sam_family.axpby_(outs, xs, ys, torch.tensor([2.0]), 0.5)  # a device coefficient and a float one
    for out, x, y in zip(outs, xs, ys):
        torch.testing.assert_close(out, 2.0 * x + 0.5 * y)
