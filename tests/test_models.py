"""Specification of fastflat.data.models: every named model maps small images to (B, num_classes) logits,
the hand-written architectures have their published sizes, and bad names are user errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastflat.errors import UserError
from fastflat.data.models import MODELS, build_model

INPUTS = [(1, 28), (3, 32), (1, 16)]  # (channels, size): Fashion-MNIST, CIFAR, synthetic


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize(("channels", "size"), INPUTS)
@pytest.mark.parametrize("name", MODELS)
def test_every_model_gives_logits_per_example(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_wide_resnet_accepts_any_valid_depth_and_width():
    logits = build_model("wrn-10-1", in_channels=3, num_classes=10, image_size=32)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wrn-16-4", 2_748_890),  # Zagoruyko & Komodakis report 2.7M
        ("wrn-28-10", 36_479_194),  # and 36.5M
        ("preact-resnet18", 11_172_170),  # the common CIFAR PreAct-ResNet-18 (11,171,146) plus the final BN
        ("resnet18", 11_173_962),  # the common CIFAR ResNet-18
        ("vgg16-bn", 14_728_266),  # the common CIFAR VGG-16-BN
    ],
)
def test_cifar10_models_have_their_published_parameter_counts(name, expected):
    assert parameter_count(build_model(name, in_channels=3, num_classes=10, image_size=32)) == expected


def test_cnn_is_small_and_trains_one_step_to_a_lower_loss():
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    assert parameter_count(model) < 200_000
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    before = F.cross_entropy(model(x), y)
    before.backward()
    optimiser.step()
    assert F.cross_entropy(model(x), y) < before


def test_resnet18_uses_a_small_image_stem():
    model = build_model("resnet18", in_channels=1, num_classes=10, image_size=28)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_models_have_no_dropout():
    for name in MODELS:
        model = build_model(name, in_channels=3, num_classes=10, image_size=32)
        assert not any(isinstance(module, nn.Dropout) for module in model.modules()), name


def test_unknown_model_raises_user_error_listing_the_choices():
    with pytest.raises(UserError) as raised:
        build_model("resnet50", in_channels=3, num_classes=10, image_size=32)
    assert all(name in str(raised.value) for name in MODELS)


@pytest.mark.parametrize("name", ["wrn-11-2", "wrn-4-1", "wrn-16-0"])
def test_invalid_wide_resnet_raises_user_error(name):
    with pytest.raises(UserError, match="divisible by 6"):
        build_model(name, in_channels=3, num_classes=10, image_size=32)


def test_images_too_small_for_the_models_raise_user_error():
    with pytest.raises(UserError, match="too small"):
        build_model("cnn", in_channels=1, num_classes=10, image_size=4)


@pytest.mark.parametrize("model, layout, laid_out", [
    ("fastcnn", "auto", True), ("cnn", "auto", False), ("cnn", "channels-last", True), ("fastcnn", "contiguous", False),
])
def test_memory_format_auto_takes_the_models_own_layout(tmp_path, model, layout, laid_out):
    from fastflat.config import load_config
    from fastflat.loop.assembly import build_trainer
    from fastflat.runs.rundir import RunDir

    cfg = load_config(overrides={"dataset": "synthetic", "subset": 64, "batch_size": 32, "model": model,
                                 "memory_format": layout, "out": str(tmp_path)})
    trainer = build_trainer(cfg, RunDir.create(tmp_path, "t"))
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert trainer.flat.channels_last is laid_out
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is laid_out
    assert conv.weight.is_contiguous() is not laid_out
