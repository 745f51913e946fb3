"""The closure factory: a batch closure and a whole-split closure accumulated in chunks."""

import pytest
import torch
from torch import nn

import fastflat
from fastflat.loss.closures import BatchClosure, SplitClosure


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))  # no BatchNorm
    return model, fastflat.flatten(model)


def data(n=103):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def chunks(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


@pytest.mark.parametrize("size", [1, 7, 32, 103])
def test_split_gradient_is_the_whole_batch_gradient_whatever_the_chunk_size(size):
    model, flat = mlp()
    x, y = data()
    whole = BatchClosure(model, flat, x, y)
    loss_whole = whole(backward=True)
    g_whole = flat.grads[0].clone()
    split = SplitClosure(model, flat, chunks(x, y, size))
    loss_split = split(backward=True)
    torch.testing.assert_close(loss_split, loss_whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flat.grads[0], g_whole, rtol=1e-5, atol=1e-7)
    assert split.loss_sum.item() == pytest.approx(loss_whole.item() * len(y), rel=1e-5)


def test_split_closure_zeroes_the_gradient_once_per_call_not_per_chunk():
    model, flat = mlp()
    x, y = data()
    flat.grads[0].fill_(123.0)  # stale: must be gone after the call
    SplitClosure(model, flat, chunks(x, y, 10))(backward=True)
    once = flat.grads[0].clone()
    SplitClosure(model, flat, chunks(x, y, 10))(backward=True)
    torch.testing.assert_close(flat.grads[0], once)  # the same, not doubled and not the last chunk's alone
    last_chunk_only = BatchClosure(model, flat, x[100:], y[100:])
    last_chunk_only(backward=True)
    assert not torch.allclose(flat.grads[0], once)


def test_a_closure_tallies_the_first_pass_over_each_part_only():
    model, flat = mlp()
    x, y = data(8)
    closure = BatchClosure(model, flat, x, y)
    first = closure(backward=True)
    closure(backward=True, update_bn=False)  # SAM's second pass: not counted again
    assert closure.loss_sum.item() == pytest.approx(first.item() * 8)


def test_label_smoothing_is_the_loss_every_pass_descends():
    """--label-smoothing s: the closures' loss, per-example losses and gradient are torch's smoothed CE."""
    model, flat = mlp()
    x, y = data()
    smoothing = 0.2
    want = nn.functional.cross_entropy(model(x), y, label_smoothing=smoothing)
    model.zero_grad(set_to_none=False)
    want.backward()
    g_want = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
    for closure in (BatchClosure(model, flat, x, y, label_smoothing=smoothing),
                    SplitClosure(model, flat, chunks(x, y, 10), label_smoothing=smoothing)):
        loss = closure(backward=True, keep_losses=True)
        torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(flat.grads[0], g_want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(closure.example_losses.mean(), want.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(closure.losses().mean(), want.detach(), rtol=1e-6, atol=1e-7)
    plain = BatchClosure(model, flat, x, y)(backward=False)
    assert abs(plain - want) > 1e-4  # without smoothing the loss differs: the option did reach the loss
