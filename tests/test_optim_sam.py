"""The SAM-family drop-ins against their originals: 20 steps of a small CNN with BatchNorm, fp64, next to
pytorch_optimizer's class of the same name (a test-only dependency) on a copy of the model: equal within
rounding, on flat buffers and on plain parameters. LookSAM departs from pytorch_optimizer where that departs
from the paper (per-tensor split, a closure on every step): the paper's formula is tested directly, and
pytorch_optimizer is matched on a model whose weights are one tensor, where the two splits agree. MSAM is
checked against its authors' update, written out here. Then the GradScaler protocol of each."""


import pytest
import torch
from torch import nn

import fastflat
from fastflat.flat import flatten

pytorch_optimizer = pytest.importorskip("pytorch_optimizer", reason="the reference implementations (dev extra)")

STEPS, LR = 20, 0.05


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g))
            for _ in range(STEPS)]


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def assert_same_model(a, b, buffers=True, rtol=1e-6, atol=1e-7):
    """Equal within rounding. pytorch_optimizer takes the global gradient norm in fp32 even for fp64
    weights (get_global_gradient_norm), so each of its steps is off by ~1e-8 relative; after 20 steps the
    weights differ by up to ~1e-8 (measured), against ~1e-3 for a wrong term of any formula here."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)
    if buffers:
        for (name, p), q in zip(a.named_buffers(), b.buffers()):
            if p.is_floating_point():
                torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def two_models(flat):
    ours, theirs = cnn(), cnn()
    if flat:
        flatten(ours)
    return ours, theirs


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_friendly_sam_matches_pytorch_optimizer(flat, adaptive):
    ours, theirs = two_models(flat)
    kwargs = dict(rho=0.05, sigma=1.0, lmbda=0.6, adaptive=adaptive, lr=LR, momentum=0.9)
    opt_a = fastflat.FriendlySAM(ours.parameters(), torch.optim.SGD, **kwargs)
    opt_b = pytorch_optimizer.FriendlySAM(theirs.parameters(), torch.optim.SGD, **kwargs)
    for x, y in batches():
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            closure = closure_for(model, opt, x, y)
            closure()
            opt.step(closure)
    assert_same_model(ours, theirs, buffers=False)  # both update BatchNorm's statistics in both passes


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_pytorch_optimizer(flat, decouple):
    ours, theirs = two_models(flat)
    kwargs = dict(rho=0.05, gamma=0.8, decouple=decouple, max_norm=5.0, lr=LR, momentum=0.9)
    opt_a = fastflat.WSAM(ours, ours.parameters(), torch.optim.SGD, **kwargs)
    opt_b = pytorch_optimizer.WSAM(theirs, theirs.parameters(), torch.optim.SGD, **kwargs)
    for x, y in batches():
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.step(closure_for(model, opt, x, y))
    assert_same_model(ours, theirs)  # BatchNorm's statistics: the first pass's only, in both


def proportion(opt):
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return scheduler, pytorch_optimizer.ProportionScheduler(scheduler, max_lr=LR, min_lr=0.0, max_value=0.1,
                                                            min_value=0.02)


@pytest.mark.parametrize("flat", [True, False])
def test_gsam_matches_pytorch_optimizer(flat):
    ours, theirs = two_models(flat)
    runs = []
    for cls, model in ((fastflat.GSAM, ours), (pytorch_optimizer.GSAM, theirs)):
        base = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        lr_scheduler, rho_scheduler = proportion(base)
        runs.append((model, cls(model.parameters(), base, model, rho_scheduler, alpha=0.3), lr_scheduler))
    for x, y in batches():
        for model, opt, lr_scheduler in runs:
            opt.set_closure(nn.functional.cross_entropy, x, y)
            opt.step()
            lr_scheduler.step()
            opt.update_rho_t()
    assert runs[0][1].rho_t == pytest.approx(runs[1][1].rho_t) and runs[0][1].rho_t < 0.1  # rho fell with the LR
    # theirs steps back by subtracting e (ours restores the saved bits): rounding of fp64 apart
    assert_same_model(ours, theirs)


def looksam_reference_step(model, x, y, state, k, alpha, rho):
    """LookSAM as the paper writes it, over all weights at once, by plain autograd."""
    params = list(model.parameters())

    def grad():
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            nn.functional.cross_entropy(model(x), y), params)])

    with torch.no_grad():
        w = torch.cat([p.reshape(-1) for p in params])
    g = grad()
    if state["step"] % k == 0:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(w + rho * g / (g.norm() + 1e-12), params)
        g_sam = grad()
        state["g_v"] = g_sam - (g @ g_sam) / (g @ g) * g
        direction = g_sam
    else:
        direction = g + alpha * g.norm() / (state["g_v"].norm() + 1e-8) * state["g_v"]
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(w - LR * direction, params)  # SGD without momentum
    state["step"] += 1


@pytest.mark.parametrize("flat", [True, False])
def test_looksam_follows_the_papers_formula_with_one_pass_between_its_sam_steps(flat):
    ours, reference = two_models(flat)
    opt = fastflat.LookSAM(ours.parameters(), torch.optim.SGD, rho=0.1, k=4, alpha=0.7, lr=LR)
    state, passes = {"step": 0}, []
    for x, y in batches():
        closure = closure_for(ours, opt, x, y)
        closure()
        calls = [0]

        def counted():
            calls[0] += 1
            return closure()

        opt.step(counted)
        passes.append(calls[0])
        looksam_reference_step(reference, x, y, state, k=4, alpha=0.7, rho=0.1)
    assert passes == [1, 0, 0, 0] * 5  # the closure (the second pass) on every 4th step only
    assert_same_model(ours, reference, buffers=False, rtol=1e-7, atol=1e-9)


def test_looksam_matches_pytorch_optimizer_where_its_per_tensor_split_is_the_global_one():
    ours, theirs = cnn(), cnn()
    flat_theirs = flatten(theirs)  # pytorch_optimizer gets the one flat tensor: per tensor = over all weights
    buffer, grad_buffer = flat_theirs.params[0], flat_theirs.grads[0]
    opt_a = fastflat.LookSAM(ours.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, lr=LR, momentum=0.9)
    opt_b = pytorch_optimizer.LookSAM([buffer], torch.optim.SGD, rho=0.1, k=3, alpha=0.7, lr=LR, momentum=0.9)

    def theirs_closure(x, y):
        def closure():
            buffer.grad = grad_buffer  # its zero_grad sets the buffer's grad to None: the views still fill it
            grad_buffer.zero_()
            loss = nn.functional.cross_entropy(theirs(x), y)
            loss.backward()
            return loss
        return closure

    for x, y in batches():
        closure = closure_for(ours, opt_a, x, y)
        closure()
        opt_a.step(closure)
        closure = theirs_closure(x, y)
        closure()
        opt_b.step(closure)
    assert_same_model(ours, theirs, buffers=False)


def test_looksam_refuses_gradient_centralisation():
    with pytest.raises(ValueError, match="not part of LookSAM"):
        fastflat.LookSAM(cnn().parameters(), torch.optim.SGD, use_gc=True, lr=LR)


def test_msam_matches_its_authors_update():
    ours, reference = cnn(), cnn()
    opt = fastflat.MSAM(ours.parameters(), lr=LR, momentum=0.9, weight_decay=1e-2, rho=0.3)
    params = list(reference.parameters())
    bufs, inverse = [torch.zeros_like(p) for p in params], 0.0
    for x, y in batches():
        closure_for(ours, opt, x, y)()
        opt.step()
        grads = torch.autograd.grad(nn.functional.cross_entropy(reference(x), y), params)
        with torch.no_grad():  # p += rho v/|v| (back); v = mu v + g + wd p; p -= lr v; p -= rho v/|v| (the next ascent)
            for p, g, v in zip(params, grads, bufs):
                d = g + 1e-2 * p
                p.add_(v, alpha=0.3 * inverse)
                v.mul_(0.9).add_(d)
                p.add_(v, alpha=-LR)
            inverse = 1.0 / (torch.stack([v.norm() for v in bufs]).norm().item() + 1e-12)
            for p, v in zip(params, bufs):
                p.sub_(v, alpha=0.3 * inverse)
    assert_same_model(ours, reference)
    opt.move_back_from_momentumAscent()
    assert not torch.equal(next(ours.parameters()), next(reference.parameters()))  # now at w, not w - rho v/|v|


def scaled_run(cls, make, scaler_scale, poison_at=None):
    """20 steps with first_step/second_step; with a GradScaler at scale 2^k when scaler_scale is given."""
    model = cnn()
    flatten(model)
    opt = make(cls, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale) if scaler_scale else None
    for i, (x, y) in enumerate(batches()):
        for stage in ("first", "second"):
            loss = nn.functional.cross_entropy(model(x), y)
            if poison_at == i and stage == "first":
                loss = loss * float("inf")
            (scaler.scale(loss) if scaler else loss).backward()
            if stage == "first":
                opt.first_step(zero_grad=True, scaler=scaler)
            else:
                opt.second_step(zero_grad=True, scaler=scaler)
        if scaler:
            scaler.update()
    return model, scaler


MAKERS = {
    "FriendlySAM": lambda cls, m: cls(m.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9),
    "LookSAM": lambda cls, m: cls(m.parameters(), torch.optim.SGD, rho=0.1, k=3, lr=LR, momentum=0.9),
    "WSAM": lambda cls, m: cls(m, m.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_power_of_two_loss_scale_changes_nothing_and_an_overflow_skips_its_step(name):
    cls = getattr(fastflat, name)
    plain, _ = scaled_run(cls, MAKERS[name], None)
    scaled, _ = scaled_run(cls, MAKERS[name], 2.0**10)
    # exact but for LookSAM's 1e-8 in |g|/(|g_v| + 1e-8), which weighs differently on scaled gradients
    loose = name == "LookSAM"
    assert_same_model(plain, scaled, rtol=1e-4 if loose else 1e-9, atol=1e-5 if loose else 1e-11)  # LookSAM: 2e-6 seen
    poisoned, scaler = scaled_run(cls, MAKERS[name], 2.0**10, poison_at=5)
    assert scaler.get_scale() == 2.0**9  # the overflow halved it once
    assert all(torch.isfinite(p).all() for p in poisoned.parameters())
