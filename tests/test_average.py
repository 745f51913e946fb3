"""Weight averaging: the fused kernel against its twin, and fastflat.AveragedModel against torch's.

The drop-in must give the parameters, buffers and n_averaged of torch.optim.swa_utils.AveragedModel
(running mean, and EMA as `get_ema_multi_avg_fn(decay)`), on the fused path for a flattened source
model and through torch's own code for a plain one.
"""

import pytest
import torch
from test_kernels import _vec, assert_near_reference
from torch import nn
from torch.optim.swa_utils import AveragedModel as TorchAveragedModel
from torch.optim.swa_utils import get_ema_multi_avg_fn, update_bn

import fastflat
from fastflat import ops
from fastflat.ops import kernels
from fastflat.flat import contiguous_cover

SIZES = [1, 7, 1023, 1025, 4097]
DTYPES = [torch.float32, torch.bfloat16]
DECAY = 0.9


# -- the kernel --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [None, DECAY], ids=["mean", "ema"])
def test_average_kernel_matches_twin(n, dtype, decay, device):
    avg, w = _vec(n, dtype, 0, device), _vec(n, dtype, 1, device)
    count = torch.tensor(3, device=device)
    avg_kernel, avg_twin = avg.clone(), avg.clone()
    kernels.average_(avg_kernel, w, count, decay)
    ops.average_torch_(avg_twin, w, count, decay)
    weight = 1 / 4 if decay is None else 1 - decay
    assert_near_reference(avg_kernel, avg_twin, avg.double() + weight * (w.double() - avg.double()))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [None, DECAY], ids=["mean", "ema"])
def test_average_first_update_copies_the_weights_exactly(n, dtype, decay, device):
    # a huge old average would leave rounding in avg + 1 * (w - avg): the copy must be exact
    avg, w = torch.full((n,), 3e30, device=device, dtype=dtype), _vec(n, dtype, 2, device)
    avg_twin = avg.clone()
    kernels.average_(avg, w, torch.tensor(0, device=device), decay)
    ops.average_torch_(avg_twin, w, torch.tensor(0, device=device), decay)
    assert torch.equal(avg, w) and torch.equal(avg_twin, w)


def test_average_kernel_reads_a_one_element_count(device):
    avg, w = torch.zeros(5, device=device), torch.ones(5, device=device)
    kernels.average_(avg, w, torch.tensor([1], device=device), None)
    assert torch.equal(avg, torch.full((5,), 0.5, device=device))


def test_average_op_routes_every_vector_to_the_kernel(triton_backend, monkeypatch):
    launched = []
    monkeypatch.setattr(kernels, "average_", lambda avg, *args: launched.append(avg.numel()))
    ops.average_([torch.zeros(3), torch.zeros(4)], [torch.ones(3), torch.ones(4)], torch.tensor(1))
    assert launched == [3, 4]


# -- the drop-in -------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 5, generator=g) for _ in range(n)]


def _train_a_little(model, opt, x):
    """Moves the weights and, in train mode, the BatchNorm statistics and num_batches_tracked."""
    model.train()
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _averages(averaged_cls, flat, n_updates=4, **kw):
    """Averages a model trained between updates; returns the averaged model."""
    model = _model()
    if flat:
        fastflat.flatten(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    averaged = averaged_cls(model, **kw)
    for x in _batches(n_updates):
        _train_a_little(model, opt, x)
        averaged.update_parameters(model)
    return averaged


def _assert_same_state(ours, reference):
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture
def count_fused_calls(monkeypatch):
    calls = []
    real = ops.average_

    def counted(*args):
        calls.append(1)
        real(*args)

    monkeypatch.setattr(ops, "average_", counted)
    return calls


@pytest.mark.parametrize("decay", [None, DECAY], ids=["mean", "ema"])
@pytest.mark.parametrize("use_buffers", [False, True], ids=["copy_buffers", "average_buffers"])
def test_dropin_on_a_flat_model_matches_torch_on_the_fused_path(
    decay, use_buffers, triton_backend, count_fused_calls
):
    torch_fn = get_ema_multi_avg_fn(decay) if decay is not None else None
    reference = _averages(TorchAveragedModel, False, multi_avg_fn=torch_fn, use_buffers=use_buffers)
    ours = _averages(fastflat.AveragedModel, True, decay=decay, use_buffers=use_buffers)
    _assert_same_state(ours, reference)
    assert ours.n_averaged.item() == 4
    # params once per update, plus the float BatchNorm buffers when they are averaged
    assert len(count_fused_calls) == 4 * (2 if use_buffers else 1)


@pytest.mark.parametrize("decay", [None, DECAY], ids=["mean", "ema"])
@pytest.mark.parametrize("use_buffers", [False, True], ids=["copy_buffers", "average_buffers"])
def test_dropin_on_a_plain_model_falls_back_to_torch(decay, use_buffers, triton_backend, count_fused_calls):
    torch_fn = get_ema_multi_avg_fn(decay) if decay is not None else None
    reference = _averages(TorchAveragedModel, False, multi_avg_fn=torch_fn, use_buffers=use_buffers)
    ours = _averages(fastflat.AveragedModel, False, decay=decay, use_buffers=use_buffers)
    _assert_same_state(ours, reference)
    assert count_fused_calls == []


def test_averaged_copy_is_one_flat_buffer():
    ours = fastflat.AveragedModel(_model())
    assert contiguous_cover(list(ours.module.parameters())) is not None


def test_first_update_copies_the_source_exactly(triton_backend):
    model = _model()
    fastflat.flatten(model)
    ours = fastflat.AveragedModel(model, decay=DECAY, use_buffers=True)
    _train_a_little(model, torch.optim.SGD(model.parameters(), lr=0.5), _batches(1)[0])
    ours.update_parameters(model)
    for mine, theirs in zip(ours.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(mine, theirs)


def test_update_bn_recomputes_statistics_on_the_flat_copy(triton_backend):
    reference = _averages(TorchAveragedModel, False)
    ours = _averages(fastflat.AveragedModel, True)
    loader = _batches(2, seed=7)
    update_bn(loader, reference)
    update_bn(loader, ours)
    _assert_same_state(ours, reference)
    assert contiguous_cover(list(ours.module.parameters())) is not None


def test_custom_avg_fn_keeps_torchs_path(count_fused_calls):
    def halfway(avg, w, _):
        return (avg + w) / 2

    reference = _averages(TorchAveragedModel, False, avg_fn=halfway)
    ours = _averages(fastflat.AveragedModel, True, avg_fn=halfway)
    _assert_same_state(ours, reference)
    assert count_fused_calls == []


def test_decay_and_a_custom_avg_fn_are_rejected():
    with pytest.raises(ValueError, match="not both"):
        fastflat.AveragedModel(_model(), decay=DECAY, avg_fn=lambda a, w, n: w)


def test_state_dict_loads_into_torchs_averaged_model(triton_backend):
    ours = _averages(fastflat.AveragedModel, True, decay=DECAY)
    reference = TorchAveragedModel(_model(), multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    reference.load_state_dict(ours.state_dict())
    _assert_same_state(ours, reference)
