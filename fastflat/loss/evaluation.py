"""Evaluate weights on a split, and resolve a device name: shared by train, cli, bench, ensemble.

    device = resolve_device("auto")
    scores = evaluate(model, data.test, data, batch_size=512)      # {"loss": ..., "acc": ...}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastflat import data as datasets
from fastflat.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    return device


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16/fp16 (autocast) upcast to fp32, fp32 and fp64 kept as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def autocast(device: torch.device, amp: str):
    """The forward pass's autocast context for `--amp` (none | bf16 | fp16); weights stay fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


FP16_DEVICE_TYPES = ("cuda",)  # fp16 autocast on CPU runs slowly and is not what CPUs train in: bf16 is


def loss_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """--amp fp16: torch's GradScaler (scale 2^16, halved on overflow, doubled after 2000 clean
    steps); None otherwise. fp16 is refused on devices without fast fp16 (a CPU)."""
    if amp != "fp16":
        return None
    if device.type not in FP16_DEVICE_TYPES:
        raise UserError(f"--amp fp16 needs a CUDA device (this run is on {device.type}); use --amp bf16 on a CPU")
    return torch.amp.GradScaler(device.type)


@torch.no_grad()
def evaluate(model: nn.Module, split: datasets.Split, dataset: datasets.Dataset, batch_size: int,
             amp: str = "none") -> dict[str, float]:
    """Mean cross-entropy and accuracy (%) of `model` on a whole split, in eval mode. Under torchrun
    each rank scores its contiguous share of the split (rank 0's BatchNorm statistics on all) and the
    sums are reduced: every example counted exactly once."""
    from fastflat.ops import dist

    dist.broadcast_buffers_(model)
    if dist.active():
        n, r, w = len(split), dist.rank(), dist.world_size()
        split = datasets.Split(split.images[r * n // w : (r + 1) * n // w], split.labels[r * n // w : (r + 1) * n // w])
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=split.labels.device)
    correct = torch.zeros((), device=split.labels.device, dtype=torch.long)
    for x, y in datasets.iterate_batches(split, batch_size, dataset=dataset, train=False):
        with autocast(x.device, amp):
            logits = at_least_fp32(model(x))  # (B, classes)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    loss_total, correct_total, n = dist.all_reduce_sum([loss_sum.item(), correct.item(), len(split)], loss_sum.device)
    return {"loss": loss_total / n, "acc": 100.0 * correct_total / n}
