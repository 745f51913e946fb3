"""What a kernel benchmark runs on: one flat vector of 2^k elements, or the parameter shapes of a real model.

    shapes = model_shapes("resnet18")                    # built on the meta device: no memory taken
    bufs = Buffers(Workload("resnet18", shapes), torch.bfloat16, device)
    w = bufs.flat("w"); ws = bufs.listed("w")            # same values, one (N,) vector or one tensor per param
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from fastflat.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_WORKLOADS = ("resnet18", "wrn-28-10", "gpt2-small")  # any fastflat.data.models name works too


@dataclass(frozen=True)
class Workload:
    label: str  # "2^20" or a model name
    shapes: tuple[tuple[int, ...], ...]  # one per trainable parameter, in named_parameters() order

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def parse_size(text: str) -> int:
    """'2^20' or '1048576' -> 1048576."""
    text = text.strip()
    try:
        if "^" in text:
            base, power = text.split("^")
            value = int(base) ** int(power)
        else:
            value = int(text)
    except ValueError:
        raise UserError(f"--sizes: {text!r} is not a size; write 2^20 or 1048576") from None
    if value < 1:
        raise UserError(f"--sizes: {text!r} must be at least 1 element")
    return value


def size_workload(text: str) -> Workload:
    n = parse_size(text)
    label = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
    return Workload(label, ((n,),))


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124,439,808 params; wte tied to the output layer), in Hugging Face's order and layout."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1 weight, bias
        shapes += [(d, 3 * d), (3 * d,)]  # attn.c_attn (Conv1D: in x out), bias
        shapes += [(d, d), (d,)]  # attn.c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]  # mlp.c_fc
        shapes += [(4 * d, d), (d,)]  # mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Trainable parameter shapes of a CIFAR-shaped (3x32x32, 10 classes) model, or of GPT-2 small."""
    if name == "gpt2-small":
        return gpt2_small_shapes()
    from fastflat.data.models import build_model

    with torch.device("meta"):  # shapes only: WRN-28-10's 36M params are never allocated
        model = build_model(name, 3, 10, 32)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def model_workload(name: str) -> Workload:
    return Workload(name, tuple(model_shapes(name)))


class Buffers:
    """Named inputs of one workload at one dtype; every provider gets fresh copies of the same values.

    Values are N(0, 1), drawn once per name on the device from a seed derived from the name, so a
    provider that reads "w" as a flat vector and one that reads it as per-parameter tensors start equal.
    """

    def __init__(self, workload: Workload, dtype: torch.dtype, device: torch.device):
        self.workload, self.dtype, self.device = workload, dtype, device
        self._values: dict[str, Tensor] = {}

    @property
    def numel(self) -> int:
        return self.workload.numel

    def base(self, name: str) -> Tensor:
        """The (N,) values of `name`; read only: providers take copies."""
        if name not in self._values:
            generator = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()))
            values = torch.randn(self.numel, generator=generator, device=self.device)
            self._values[name] = values.to(self.dtype)
        return self._values[name]

    def flat(self, name: str) -> Tensor:
        """A fresh (N,) copy: the layout of a fastflat flat buffer."""
        return self.base(name).clone()

    def listed(self, name: str) -> list[Tensor]:
        """Fresh, separately allocated tensors, one per parameter shape: the layout of an unflattened model."""
        out, offset = [], 0
        source = self.base(name)
        for shape in self.workload.shapes:
            n = math.prod(shape)
            out.append(source[offset : offset + n].clone().view(shape))
            offset += n
        return out
