"""Learning-rate schedules as pure functions of the iteration: lr = f(step), no state to save.

A pure function makes resume exact (the step count is the whole state) and lets methods that own
their cycle (SWA, FGE, snapshots) compose formulas freely; `make_schedule` builds the trainer's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[int], float]  # step index (0-based, counted in optimizer steps) -> lr


def constant(lr: float) -> Schedule:
    return lambda step: lr


def step_decay(lr: float, total_steps: int, milestones=(0.5, 0.75), gamma: float = 0.1) -> Schedule:
    """lr * gamma^k, where k counts the milestones (fractions of the budget) already passed."""
    bounds = [int(m * total_steps) for m in milestones]
    return lambda step: lr * gamma ** sum(step >= b for b in bounds)


def cosine(lr: float, total_steps: int) -> Schedule:
    """Half a cosine from lr down to 0 over total_steps (Loshchilov & Hutter, no restarts)."""
    return lambda step: 0.5 * lr * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def with_warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """Linear warmup from lr/warmup_steps up to the schedule's value, then the schedule shifted by it."""
    if warmup_steps <= 0:
        return schedule
    return lambda step: (
        schedule(0) * (step + 1) / warmup_steps if step < warmup_steps else schedule(step - warmup_steps)
    )


def make_schedule(name: str, lr: float, total_steps: int, warmup_steps: int = 0) -> Schedule:
    main_steps = max(total_steps - warmup_steps, 1)
    if name == "constant":
        base = constant(lr)
    elif name == "step":
        base = step_decay(lr, main_steps)
    elif name == "cosine":
        base = cosine(lr, main_steps)
    else:
        raise ValueError(f"unknown schedule {name!r}")
    return with_warmup(base, warmup_steps)
