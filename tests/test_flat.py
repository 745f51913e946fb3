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


# -- channels_last layout (--memory-format channels-last; fastcnn's default) ------------------------------
def _two_small_cnns():
    from fastflat.data.models import SmallCNN

    torch.manual_seed(0)
    plain, laid = SmallCNN(1, 10, (8, 16, 16)), SmallCNN(1, 10, (8, 16, 16))
    laid.load_state_dict(plain.state_dict())
    return plain, fastflat.flatten(plain), laid, fastflat.flatten(laid, channels_last=True)


def test_channels_last_lays_conv_weights_out_nhwc_with_the_same_values():
    plain, _, laid, flat = _two_small_cnns()
    conv = laid.features[4].weight  # (16, 8, 3, 3)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert conv.grad.stride() == conv.stride()
    # the buffer holds it as (O, kh, kw, I): that order, read back, is the same tensor
    start = flat.vectors[0].offsets[flat.vectors[0].names.index("features.4.weight")]
    assert torch.equal(flat.params[0][start : start + conv.numel()].view(16, 3, 3, 8).permute(0, 3, 1, 2), conv)
    for (name, p), q in zip(plain.named_parameters(), laid.parameters()):
        assert torch.equal(p, q), name
    assert flat.views_intact()


def test_channels_last_gradients_match_the_contiguous_layout():
    plain, _, laid, flat = _two_small_cnns()
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))
    for model in (plain, laid):
        nn.functional.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), laid.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert flat.grads[0].abs().sum() > 0  # filled in place: the buffer saw them


def test_shaped_and_param_view_follow_each_parameters_strides():
    from fastflat.flat import param_view

    _, _, laid, flat = _two_small_cnns()
    direction = torch.randn(flat.numel)
    pieces = flat.shaped([direction])
    names = flat.vectors[0].names
    for name, piece, offset in zip(names, pieces, flat.vectors[0].offsets):
        p = laid.get_parameter(name)
        assert piece.shape == p.shape and piece.stride() == p.stride(), name
        # the same elements p would see were the direction copied into the buffer
        assert piece.data_ptr() == direction[offset:].data_ptr(), name
    flat.params[0].data.copy_(direction)
    for name, piece in zip(names, pieces):
        assert torch.equal(piece, laid.get_parameter(name)), name
    batch = torch.stack([direction, 2 * direction])  # (2, N): leading dims batch several vectors
    conv_offset = flat.vectors[0].offsets[names.index("features.4.weight")]
    both = param_view(batch, conv_offset, laid.features[4].weight)
    assert both.shape == (2, 16, 8, 3, 3) and torch.equal(both[1], 2 * laid.features[4].weight)


def test_contiguous_cover_accepts_channels_last_views():
    _, _, laid, flat = _two_small_cnns()
    cover = contiguous_cover(list(laid.parameters()))
    assert cover is not None and cover.data_ptr() == flat.params[0].data_ptr() and cover.numel() == flat.numel
