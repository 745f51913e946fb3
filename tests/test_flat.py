"""The flat buffer's contract: params and grads are views, and the torch facts it relies on."""

import pytest
import torch
from torch import nn

import fastflat
from fastflat.flat import contiguous_cover, paired_covers


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def _loss(model, seed=1):
    torch.manual_seed(seed)
    return model(torch.randn(4, 1, 6, 6)).square().mean()


def test_flatten_keeps_values_and_makes_views():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = fastflat.flatten(model)
    assert len(flat.vectors) == 1 and flat.numel == sum(p.numel() for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    flat.params[0].fill_(0.5)
    assert all((p == 0.5).all() for p in model.parameters())


def test_backward_accumulates_into_the_grad_buffer():
    model = _model()
    flat = fastflat.flatten(model)
    _loss(model).backward()
    reference = _model()
    _loss(reference).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    torch.testing.assert_close(flat.grads[0], expected)
    assert flat.views_intact()


def test_torch_optimizer_step_keeps_param_views():
    model = _model()
    flat = fastflat.flatten(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    _loss(model).backward()
    opt.step()
    assert flat.views_intact()


def test_zero_grad_set_to_none_detaches_grads_so_zero_in_place():
    model = _model()
    flat = fastflat.flatten(model)
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()  # default set_to_none=True
    assert not flat.views_intact()
    with pytest.raises(RuntimeError, match="flatten"):
        flat.check_views()
    flat = fastflat.flatten(model)
    _loss(model).backward()
    flat.zero_grad_()
    assert flat.views_intact() and flat.grads[0].abs().sum() == 0


def test_assigning_p_data_detaches_the_param():
    model = _model()
    flat = fastflat.flatten(model)
    first = next(model.parameters())
    first.data = first.data.clone()
    assert not flat.views_intact()


def test_model_to_another_dtype_recreates_params():
    model = _model()
    flat = fastflat.flatten(model)
    model.to(torch.float64)
    assert not flat.views_intact()


def test_one_vector_per_dtype():
    model = _model()
    model[3].to(torch.float64)
    flat = fastflat.flatten(model)
    assert sorted(str(v.param.dtype) for v in flat.vectors) == ["torch.float32", "torch.float64"]


def test_frozen_params_stay_out_of_the_buffer():
    model = _model()
    model[0].weight.requires_grad_(False)
    flat = fastflat.flatten(model)
    assert flat.numel == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_plain_model_loads_a_flattened_models_state_dict(tmp_path):
    model = _model(seed=3)
    fastflat.flatten(model)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    plain = _model(seed=4)
    plain.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_contiguous_cover_finds_the_buffer_and_rejects_gaps():
    model = _model()
    flat = fastflat.flatten(model)
    params = list(model.parameters())
    cover = contiguous_cover(params)
    assert cover.data_ptr() == flat.params[0].data_ptr() and cover.numel() == flat.numel
    assert contiguous_cover(params[1:]) is not None  # a sub-range still tiles
    assert contiguous_cover([params[0], params[2]]) is None  # a gap does not
    assert contiguous_cover(list(_model().parameters())) is None  # separate tensors do not


def test_paired_covers_pair_params_with_their_grads():
    model = _model()
    flat = fastflat.flatten(model)
    params = list(model.parameters())
    covers = paired_covers(params, [p.grad for p in params])
    assert len(covers) == 1
    assert covers[0][1].data_ptr() == flat.grads[0].data_ptr()
