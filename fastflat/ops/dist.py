"""Where this process stands in a torch.distributed job (torchrun), and the few collectives fastflat uses.

    dist.init_from_env(device)       # under torchrun: join the group (NCCL on CUDA, gloo on CPU)
    if dist.is_main(): ...           # rank 0, or a plain single-process run

A leaf module: without an initialised process group every call answers as a single process and
every collective is a no-op, so single-process code paths never change.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn


def active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or any launcher that sets its environment) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> None:
    """Join the job torchrun describes in the environment, once; a no-op in a plain run."""
    if not launched() or (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch_dist.init_process_group(backend="nccl" if cuda else "gloo")


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Average each tensor over the ranks, in place: one all-reduce per flat vector."""
    if not active():
        return
    n = world_size()
    for t in tensors:
        torch_dist.all_reduce(t)
        t.div_(n)


def all_reduce_sum(values: list[float | int], device: torch.device) -> list[float]:
    """Sums over the ranks of a few numbers (epoch tallies, evaluation counts), as floats (fp64)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any (a stop request must stop all ranks at the same step)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t)
    return bool(t.item() > 0)


def broadcast_buffers_(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics to every rank (as DDP's broadcast_buffers), so evaluation and
    checkpoints see one model."""
    if active():
        for b in model.buffers():
            torch_dist.broadcast(b, src=0)


def broadcast_object(value: Any) -> Any:
    """Rank 0's value (a run directory's path) on every rank."""
    if not active():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def assert_identical(tensors: list[Tensor], what: str) -> None:
    """Every rank holds bitwise what rank 0 holds, or a RuntimeError naming the ranks' divergence."""
    if not active():
        return
    for t in tensors:
        reference = t.detach().clone()
        torch_dist.broadcast(reference, src=0)
        if not torch.equal(reference, t):
            raise RuntimeError(f"rank {rank()}'s {what} differ from rank 0's: the ranks diverged")


def finish() -> None:
    """Leave the process group (after the last collective), so the job ends without warnings."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
