"""The drop-ins give the same parameters as the references they imitate.

`ReferenceSAM` restates the widely used PyTorch SAM optimizer (davda54/sam) step by step: per-param
loop, `old_p` clones, e = rho * (w^2 if adaptive) * g / ||(|w| if adaptive) g||, restore, base step.
"""

import pytest
import torch
from torch import nn

import fastflat


class ReferenceSAM:
    def __init__(self, params, rho, adaptive, **sgd_kwargs):
        self.params = list(params)
        self.rho, self.adaptive = rho, adaptive
        self.base = torch.optim.SGD(self.params, **sgd_kwargs)

    @torch.no_grad()
    def first_step(self):
        scaled = [(p.abs() if self.adaptive else 1.0) * p.grad for p in self.params]
        grad_norm = torch.stack([s.norm(2) for s in scaled]).norm(2)
        self.old = [p.clone() for p in self.params]
        for p in self.params:
            p.add_((p.pow(2) if self.adaptive else 1.0) * p.grad * (self.rho / (grad_norm + 1e-12)))
        self.base.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for p, old in zip(self.params, self.old):
            p.copy_(old)
        self.base.step()
        self.base.zero_grad()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 7, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _run_sam(model, opt, batches):
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class _Ours:
    def __init__(self, sam):
        self.sam = sam

    def first_step(self):
        self.sam.first_step(zero_grad=True)

    def second_step(self):
        self.sam.second_step(zero_grad=True)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("flat", [False, True], ids=["foreach", "flat"])
def test_sam_dropin_matches_reference_sam(adaptive, flat, triton_backend):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference = _model()
    expected = _run_sam(reference, ReferenceSAM(reference.parameters(), 0.05, adaptive, **kw), _batches())
    model = _model()
    if flat:
        fastflat.flatten(model)
    sam = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, **kw)
    got = _run_sam(model, _Ours(sam), _batches())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, torch.cat([p.reshape(-1) for p in _model().parameters()]).detach())


def test_sam_flat_path_keeps_the_buffer_views(triton_backend):
    model = _model()
    flat = fastflat.flatten(model)
    sam = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    _run_sam(model, _Ours(sam), _batches(2))
    assert flat.views_intact()


def test_sam_step_with_closure_equals_two_explicit_steps():
    x, y = _batches(1)[0]
    a, b = _model(), _model()
    opt_a = fastflat.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt_b = fastflat.SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)

    def closure():
        loss = nn.functional.cross_entropy(a(x), y)
        loss.backward()
        return loss

    clean = closure()
    returned = opt_a.step(closure)
    _run_sam(b, _Ours(opt_b), [(x, y)])
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    # like torch optimizers, step returns its closure's loss: here at w + e, which SAM raises above L(w)
    assert isinstance(returned, torch.Tensor) and returned.ndim == 0 and float(returned.detach()) > float(clean.detach())


def test_sam_linf_moves_every_weight_by_rho():
    model = _model()
    fastflat.flatten(model)
    sam = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.01, norm="linf", lr=0.1)
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    sam.first_step()
    moved = torch.cat([(p - b).abs().reshape(-1) for p, b in zip(model.parameters(), before)])
    nonzero_grad = torch.cat([p.grad.reshape(-1) != 0 for p in model.parameters()])
    torch.testing.assert_close(moved[nonzero_grad], torch.full_like(moved[nonzero_grad], 0.01))


def test_sam_rejects_negative_rho():
    with pytest.raises(ValueError, match="rho"):
        fastflat.SAM(_model().parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)


@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_clip_grad_norm_matches_torch(flat, max_norm, triton_backend):
    x, y = _batches(1)[0]
    reference, model = _model(), _model()
    if flat:
        fastflat.flatten(model)
    for m in (reference, model):
        nn.functional.cross_entropy(m(x), y).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    got_norm = fastflat.clip_grad_norm_(model.parameters(), max_norm)
    torch.testing.assert_close(got_norm, expected_norm)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_clip_grad_norm_other_norm_types_fall_back_to_torch():
    x, y = _batches(1)[0]
    reference, model = _model(), _model()
    fastflat.flatten(model)
    for m in (reference, model):
        nn.functional.cross_entropy(m(x), y).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01, norm_type=float("inf"))
    torch.testing.assert_close(fastflat.clip_grad_norm_(model.parameters(), 0.01, norm_type="inf"), expected)
