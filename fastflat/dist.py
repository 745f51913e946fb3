"""Where this process stands in a torch.distributed job (torchrun): rank 0 alone writes files.

    if dist.is_main(): ...          # rank 0, or a plain single-process run

A leaf module: without an initialised process group every call answers as a single process.
"""

from __future__ import annotations

import torch.distributed as torch_dist


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0
