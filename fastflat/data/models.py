"""Image classifiers by name, sized for small images (16x16 to 32x32).

`build_model("resnet18", in_channels=3, num_classes=10, image_size=32)` returns an nn.Module mapping
(B, C, H, W) float images to (B, num_classes) logits. ResNet-18 and VGG-16-BN are torchvision's,
adapted to small inputs; pre-activation ResNet-18 and Wide ResNets share one block written here.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from torchvision.models import resnet, vgg

from fastflat.errors import UserError

MODELS = ("fastcnn", "cnn", "resnet18", "preact-resnet18", "wrn-16-4", "vgg16-bn")
FASTCNN_WIDTHS = (16, 32, 64)  # half the cnn's: 2.8x less time per step on 2 cores, NHWC included
MIN_IMAGE_SIZE = 8  # the cnn halves the resolution three times
_WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)")


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build the model `name`: one of MODELS, any "wrn-D-K" with (D - 4) divisible by 6, or any
    "torchvision:NAME" / "timm:NAME" classifier, sized for the dataset's classes and channels."""
    if name.startswith(("torchvision:", "timm:")):
        return _hub_model(name, in_channels, num_classes)
    if name.startswith("custom:"):
        raise UserError(f"this run's model ({name}) was passed in Python: load it with fastflat.resume(run, "
                        "model=...) or build it yourself and load RUN/checkpoint.pt's 'model' state_dict")
    if image_size < MIN_IMAGE_SIZE:
        size = f"{image_size}x{image_size}"
        raise UserError(f"{size} images are too small: models need at least {MIN_IMAGE_SIZE} pixels a side")
    if name == "cnn":
        return SmallCNN(in_channels, num_classes)
    if name == "fastcnn":
        return FastCNN(in_channels, num_classes)
    if name == "resnet18":
        return _cifar_resnet18(in_channels, num_classes)
    if name == "vgg16-bn":
        return _cifar_vgg16_bn(in_channels, num_classes)
    if name == "preact-resnet18":
        return PreActNet(in_channels, num_classes, stem_width=64, widths=(64, 128, 256, 512), blocks_per_stage=2)
    if match := _WRN_NAME.fullmatch(name):
        return _wide_resnet(int(match[1]), int(match[2]), in_channels, num_classes)
    raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)} (or wrn-D-K, e.g. wrn-28-10)")


def _hub_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision:NAME (grayscale repeated to the 3 channels its stem expects) or timm:NAME (its own in_chans)."""
    source, _, arch = name.partition(":")
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise UserError(f"--model {name} needs timm: pip install 'fastflat[timm]'") from None
        try:
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        except RuntimeError as e:  # timm's "Unknown model"
            raise UserError(f"--model {name}: {e}") from None
    from torchvision import models as tv_models

    if arch not in tv_models.list_models(module=tv_models):
        raise UserError(f"--model {name}: torchvision has no classifier {arch!r} (e.g. resnet18, mobilenet_v3_small)")
    model = tv_models.get_model(arch, weights=None, num_classes=num_classes)
    return model if in_channels == 3 else nn.Sequential(_RepeatChannels(in_channels), model)


class _RepeatChannels(nn.Module):
    """(B, C, H, W) -> (B, 3, H, W): grayscale repeated, the usual way to feed an RGB stem."""

    def __init__(self, in_channels: int):
        super().__init__()
        if in_channels != 1:
            raise UserError(f"torchvision models take 1 or 3 input channels, the data has {in_channels}; use timm:NAME")

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1)


class SmallCNN(nn.Module):
    """Three conv blocks (32, 64, 128 channels) each halving the resolution, a 2x2 average pool, a linear layer.

    Each block is conv3x3 -> max-pool -> BN -> ReLU: pooling first runs BN and ReLU on 4x fewer
    values, which matters on a CPU. Pooling to 2x2 rather than 1x1 keeps coarse position, worth
    ~2 points of Fashion-MNIST test accuracy after 2 epochs. Sides go 28 -> 14 -> 7 -> 4 -> 2
    (16 and 32 also end at 2).
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        blocks, channels = [], in_channels
        for width in widths:
            blocks += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),  # BN supplies the bias
                nn.MaxPool2d(2, ceil_mode=True),  # ceil: odd sizes keep their last row/column (7 -> 4)
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(2), nn.Flatten())  # (B, 4 * channels)
        self.classifier = nn.Linear(4 * channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class FastCNN(SmallCNN):
    """SmallCNN's blocks at half the width (16, 32, 64 channels; 25k parameters), laid out channels_last: the
    default model, chosen for time to accuracy on a CPU (docs/results.md "Time to accuracy").

    On 2 CPU cores NCHW max-pooling cost as much as every convolution's forward pass together
    (benchmarks/results/profile-main-job-*.txt); in NHWC it is 13-18x faster, so the trainer lays this
    model's conv weights out channels_last (`preferred_memory_format`, read by --memory-format auto).
    A forward+backward pass of 128 Fashion-MNIST images: 15.9 ms against the cnn's 74 ms (NCHW) and
    44 ms (NHWC), quiet 2-core AMD EPYC (Zen 2).
    """

    preferred_memory_format = torch.channels_last

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = FASTCNN_WIDTHS):
        super().__init__(in_channels, num_classes, widths)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus a shortcut.

    The shortcut is a strided 1x1 conv of the first activation when the shape changes, else identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        reshapes = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if reshapes else None

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class PreActNet(nn.Module):
    """3x3 stem conv, stages of PreActBlocks (the first of each stage after the first strides by 2),
    then BN-ReLU, global average pool and a linear layer. Covers PreAct-ResNet-18 and WRN-D-K."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        stem_width: int,
        widths: tuple[int, ...],
        blocks_per_stage: int,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False)]
        channels = stem_width
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(PreActBlock(channels, width, stride))
                channels = width
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        _init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _wide_resnet(depth: int, widen: int, in_channels: int, num_classes: int) -> PreActNet:
    """WRN-depth-widen (Zagoruyko & Komodakis 2016): 3 stages of width 16k/32k/64k, (depth-4)/6 blocks each."""
    if depth < 10 or (depth - 4) % 6 != 0 or widen < 1:
        raise UserError(
            f"invalid wide ResNet 'wrn-{depth}-{widen}': depth D must be 10, 16, 22, 28, ... "
            f"((D - 4) divisible by 6) and width K >= 1; choose one of: {', '.join(MODELS)} or e.g. wrn-28-10"
        )
    widths = (16 * widen, 32 * widen, 64 * widen)
    return PreActNet(in_channels, num_classes, stem_width=16, widths=widths, blocks_per_stage=(depth - 4) // 6)


def _cifar_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool."""
    model = resnet.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    _init_convs(model.conv1)
    model.maxpool = nn.Identity()
    return model


def _cifar_vgg16_bn(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's VGG-16-BN convolutions (max-pools in ceil mode, so 28x28 reaches 1x1), then 512 -> classes.

    Built with torchvision's own layer builder and config "D" (VGG-16): vgg16_bn() would also
    allocate its 120M-parameter ImageNet classifier, which takes seconds and is thrown away.
    """
    features = vgg.make_layers(vgg.cfgs["D"], batch_norm=True)
    features[0] = nn.Conv2d(in_channels, features[0].out_channels, 3, padding=1)
    for layer in features:
        if isinstance(layer, nn.MaxPool2d):
            layer.ceil_mode = True
    _init_convs(features)
    # The pool only matters for inputs above 32x32; at 16-32 pixels the features are already 1x1.
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


def _init_convs(model: nn.Module) -> None:
    """He-normal (fan-out) conv weights and zero conv biases, as torchvision initialises ResNet and VGG."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
