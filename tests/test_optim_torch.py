"""The originals' own tests, run against our drop-ins.

clip_grad_norm_: the cases of PyTorch's test_nn.py (`test_clip_grad_norm`,
`test_clip_grad_norm_error_if_nonfinite`), each on plain tensors (torch's path) and on tensors that
tile one flat buffer (our fused path), where last round's version failed (fp32 accumulation of fp64
gradients overflowed at 1e20; it scaled before raising; mixed dtypes returned fp32).
fastflat.SAM: state and scheduler behaviour users rely on with the popular PyTorch SAM (davda54/sam).
"""

import copy
import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import fastflat
from fastflat.flat import FlatParams

NORM_TYPES = [0.5, 1.5, 2, 4, "inf"]
inf, nan = math.inf, math.nan


def make_params(shapes, dtype=torch.float32, flat=False):
    """Parameters with zero grads; flat=True puts params and grads in one fastflat buffer."""
    holder = nn.ParameterList([nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes])
    for p in holder:
        p.grad = torch.zeros_like(p)
    if flat:
        FlatParams(holder)
    return list(holder)


def total_norm(params, norm_type):
    norm_type = float(norm_type)
    if norm_type == inf:
        return max(p.grad.abs().max() for p in params)
    return sum(p.grad.abs().pow(norm_type).sum() for p in params) ** (1.0 / norm_type)


@pytest.mark.parametrize("flat", [False, True])
def test_clip_grad_norm_scales_big_gradients_to_max_norm_uniformly(flat):
    params = make_params([(10, 10), (10,)], flat=flat)
    grads = torch.arange(1.0, 101).view(10, 10), torch.ones(10) / 1000
    for norm_type in NORM_TYPES:
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        before = total_norm(params, norm_type)
        returned = fastflat.clip_grad_norm_(params, 2, norm_type=norm_type)
        torch.testing.assert_close(returned, before)
        torch.testing.assert_close(total_norm(params, norm_type), torch.tensor(2.0))
        scale = torch.cat([(p.grad / g).reshape(-1) for p, g in zip(params, grads)])
        assert scale.std() < 1e-6  # every gradient scaled by the same factor


@pytest.mark.parametrize("flat", [False, True])
def test_clip_grad_norm_leaves_small_gradients_unchanged(flat):
    params = make_params([(10, 10), (10,)], flat=flat)
    grads = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) / 10000, torch.ones(10) / 500
    for norm_type in NORM_TYPES:
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        before = total_norm(params, norm_type)
        returned = fastflat.clip_grad_norm_(params, 2, norm_type=norm_type)
        torch.testing.assert_close(returned, before)
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad, g)


def test_clip_grad_norm_accepts_a_single_tensor():
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    p1.grad = torch.arange(1.0, 101).view(10, 10)
    p2.grad = p1.grad.clone()
    for norm_type in NORM_TYPES:
        fastflat.clip_grad_norm_(p1, 2, norm_type=norm_type)
        fastflat.clip_grad_norm_([p2], 2, norm_type=norm_type)
        assert torch.equal(p1.grad, p2.grad)


# torch's table: (grad in one element only, prefix a param with grad 1, scalars,
#                 norm types whose total is non-finite, norm types whose total is finite)
POS, NEG = [0.1, 1, 2, 3.5, inf], [-0.1, -1, -2, -3.5]
NONFINITE_CASES = [
    (False, False, [inf, -inf], POS + NEG, [0]),
    (False, True, [inf, -inf], POS, NEG + [0]),
    (True, False, [inf, -inf], POS, NEG + [0]),
    (True, True, [inf, -inf], POS, NEG + [0]),
    (False, False, [nan], POS + NEG, [0]),
    (False, True, [nan], POS + NEG, [0]),
    (True, False, [nan], POS + NEG, [0]),
    (True, True, [nan], POS + NEG, [0]),
    (False, False, [2e22, -2e22], [], POS + NEG + [0]),  # overflowed fp32 accumulation last round
    (False, True, [2e22, -2e22], [], POS + NEG + [0]),
    (True, False, [2e22, -2e22], [], POS + NEG + [0]),
    (True, True, [2e22, -2e22], [], POS + NEG + [0]),
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [inf, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], NEG + [inf, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], NEG + [inf, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], NEG + [inf, 1, 0.1, 0]),
]


def fp64_params(scalar, one_elem, prefix, flat):
    shapes = [(1,), (10,)] if prefix else [(10,)]
    params = make_params(shapes, dtype=torch.float64, flat=flat)
    with torch.no_grad():
        for p in params:
            p.fill_(1.0)
    main = params[-1]
    (main[1] * scalar if one_elem else (main * scalar).sum()).backward()
    if prefix:
        params[0].sum().backward()
    return params


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=lambda c: f"{c[2][0]:g}-one{c[0]:d}-prefix{c[1]:d}")
def test_clip_grad_norm_error_if_nonfinite_raises_exactly_when_torch_does(case, flat):
    one_elem, prefix, scalars, nonfinite, finite = case
    for error_if_nonfinite in (False, True):
        for norm_type, scalar in itertools.product(nonfinite + finite, scalars):
            params = fp64_params(scalar, one_elem, prefix, flat)
            expect_error = norm_type in nonfinite and error_if_nonfinite
            if expect_error:
                before = [p.grad.clone() for p in params]
                with pytest.raises(RuntimeError, match=f"The total norm of order {float(norm_type)} for gradients"):
                    fastflat.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=True)
                for p, b in zip(params, before):  # untouched when it raises
                    assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())
            else:
                fastflat.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)


def test_flat_fp64_norm_is_exact_where_fp32_would_overflow():
    params = make_params([(10,)], dtype=torch.float64, flat=True)
    params[0].grad.fill_(1e20)
    norm = fastflat.clip_grad_norm_(params, 1.0)
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(1e20 * math.sqrt(10))
    assert params[0].grad.norm().item() == pytest.approx(1.0)


def test_flat_fp16_overflow_matches_torch():
    ours, theirs = make_params([(10,)], dtype=torch.float16, flat=True), make_params([(10,)], dtype=torch.float16)
    for p in ours + theirs:
        p.grad.fill_(30000.0)  # norm 94868 > fp16 max: inf in torch, then every gradient times 0
    assert torch.equal(fastflat.clip_grad_norm_(ours, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    assert torch.equal(ours[0].grad, theirs[0].grad)


def test_mixed_fp32_fp64_returns_torch_dtype():
    holder = nn.ParameterList([nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3, dtype=torch.float64))])
    FlatParams(holder)  # two buffers, one per dtype
    for p in holder:
        p.grad.fill_(1.0)
    plain = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3, dtype=torch.float64))]
    for p in plain:
        p.grad = torch.ones_like(p)
    ours, theirs = fastflat.clip_grad_norm_(list(holder), 1.0), torch.nn.utils.clip_grad_norm_(plain, 1.0)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator"):
        result = fastflat.clip_grad_norm_((p for p in []), 1.0)
    assert torch.equal(result, torch.tensor(0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastflat.clip_grad_norm_([], 1.0)  # an empty list: no warning, as torch


# -- fastflat.SAM: state and schedulers ----------------------------------------------------------------
def sam_setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    fastflat.flatten(model)
    opt = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    return model, opt


def sam_steps(model, opt, n=3):
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    for _ in range(n):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def test_sam_state_dict_carries_the_base_optimizers_momentum():
    model, opt = sam_setup()
    sam_steps(model, opt)
    saved = copy.deepcopy(opt.state_dict())  # as a round trip through a file would: no shared tensors
    weights = [p.detach().clone() for p in model.parameters()]
    model2, opt2 = sam_setup(seed=1)
    with torch.no_grad():
        for p, w in zip(model2.parameters(), weights):
            p.copy_(w)
    opt2.load_state_dict(saved)
    sam_steps(model, opt)
    sam_steps(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_after_load_state_dict_param_groups_are_the_base_optimizers():
    model, opt = sam_setup()
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.5
    opt.load_state_dict(saved)
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.base_optimizer.param_groups[0]["lr"] == 0.5
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)  # attached after loading
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        sam_steps(model, opt, n=1)
        scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_a_state_dict_of_the_popular_sam_loads():
    """Its groups have rho and adaptive but no `norm`, its state holds the saved weights `old_p`, and it
    has no base-optimizer state: this raised KeyError: 'norm' on the first step."""
    model, opt = sam_setup()
    theirs = {"state": {0: {"old_p": torch.zeros(8, 4)}},
              "param_groups": [{"rho": 0.1, "adaptive": False, "lr": 0.2, "momentum": 0.9, "dampening": 0,
                                "weight_decay": 0, "nesterov": False, "maximize": False, "foreach": None,
                                "differentiable": False, "fused": None, "params": [0, 1, 2, 3]}]}
    opt.load_state_dict(theirs)
    assert opt.param_groups[0]["norm"] == "l2" and opt.param_groups[0]["rho"] == 0.1
    sam_steps(model, opt, n=1)
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.2


def test_sam_perturbs_fp64_weights_in_fp64():
    model = nn.Linear(3, 1).double()
    fastflat.flatten(model)
    opt = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=1e-9, lr=0.1)
    w0 = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.first_step()
    moved = torch.cat([(p - w).reshape(-1) for p, w in zip(model.parameters(), w0)])
    # fp64 math: off by the rounding of w + e alone (~1e-16); fp32 math rounded w itself (~1e-8 off)
    torch.testing.assert_close(moved, 1e-9 * g / g.norm(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("undo", ["zero_grad", "to_bf16"])
def test_sam_refuses_views_that_left_the_flat_buffer(undo):
    model, opt = sam_setup()
    if undo == "zero_grad":
        model.zero_grad()  # torch's default set_to_none=True detaches the grads
    else:
        model.to(torch.bfloat16)
    x = torch.randn(4, 4, dtype=next(model.parameters()).dtype)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="no longer points into the flat buffer"):
        opt.first_step()
