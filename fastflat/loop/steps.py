"""The pieces of a training step that the trainer, the benchmarks and the tests share: the progress
callbacks (Hooks), where the loop is (Position), one whole step (train_step) and an epoch's RNG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastflat.flat import FlatParams
from fastflat.methods import Closure, Method

MAX_SKIPS_IN_A_ROW = 20  # --on-nonfinite skip: give up when this many steps in a row are non-finite
MAX_ROLLBACKS = 3  # --on-nonfinite rollback: each halves the learning rate; then give up


class Hooks:
    """Progress callbacks; the defaults do nothing. The CLI subclasses this with a Rich display."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, step: int, metrics: dict[str, Any]) -> None: ...
    def on_epoch(self, record: dict[str, Any]) -> None: ...
    def on_event(self, message: str) -> None: ...  # a skipped step, a rollback
    def on_end(self, summary: dict[str, Any]) -> None: ...


@dataclass
class Position:
    """Where the loop is: the whole of the loop's own state that a checkpoint needs."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # next batch index inside the epoch
    step: int = 0  # optimizer steps taken in total (skipped non-finite steps included)
    loss_sum: float = 0.0  # this epoch so far: training loss summed over examples (fp32 on device)
    correct: int = 0  # this epoch so far: correct training predictions
    seen: int = 0  # this epoch so far: training examples
    seconds: float = 0.0  # this epoch so far: wall time of its steps, across interruptions
    skipped: int = 0  # non-finite steps skipped (--on-nonfinite skip), whole run
    overflows: int = 0  # --amp fp16: steps the loss scaler skipped (overflowed gradient), whole run
    lr_scale: float = 1.0  # halved by each rollback (--on-nonfinite rollback)
    rollbacks: int = 0


def train_step(method: Method, flat: FlatParams, closure: Closure, lr: float, step: int) -> dict[str, Any]:
    """One whole step, shared by the trainer, the benchmarks and the tests: check the flat views
    (a user's `zero_grad(set_to_none=True)` or `.to()` undoes them), take the method's step at
    `lr`, then its after-step work (averages, collection) for 0-based `step`."""
    flat.check_views()
    metrics = method.step(flat, closure, lr)
    method.after_step(flat, step + 1)
    return metrics


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Batch order and augmentation of an epoch depend on (seed, epoch) only: resumable mid-epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
