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


# -- schedules that methods own (SWA, snapshot ensembles, FGE) ---------------------------------------
def cycle_position(i: int, c: int) -> float:
    """t(i) = (mod(i - 1, c) + 1) / c for the 1-based iteration i: 1/c, ..., 1 within each cycle."""
    return ((i - 1) % c + 1) / c


def swa_cyclic(alpha1: float, alpha2: float, c: int) -> Schedule:
    """SWA (Izmailov et al. 2018, eq. 2): alpha(i) = (1 - t(i)) alpha1 + t(i) alpha2.

    Takes the 0-based step; alpha reaches alpha2 at the last iteration of each cycle, where SWA
    averages. alpha1 == alpha2 is the constant-LR variant.
    """
    return lambda step: (1 - cycle_position(step + 1, c)) * alpha1 + cycle_position(step + 1, c) * alpha2


def fge_triangular(alpha1: float, alpha2: float, c: int) -> Schedule:
    """FGE (Garipov et al. 2018, sec. 4): linear alpha1 -> alpha2 over the first half cycle, back after.

    alpha(i) = (1 - 2t) alpha1 + 2t alpha2 for 0 < t <= 1/2; (2 - 2t) alpha2 + (2t - 1) alpha1 after,
    with t = t(i) on the 1-based iteration i. The minimum alpha2 is at t = 1/2, where FGE collects.
    """

    def lr(step: int) -> float:
        t = cycle_position(step + 1, c)
        return (1 - 2 * t) * alpha1 + 2 * t * alpha2 if t <= 0.5 else (2 - 2 * t) * alpha2 + (2 * t - 1) * alpha1

    return lr


def snapshot_cosine(alpha0: float, total_steps: int, cycles: int) -> Schedule:
    """Snapshot ensembles (Huang et al. 2017, eq. 2): alpha(t) = alpha0/2 (cos(pi mod(t, P) / P) + 1),
    P = ceil(T / M), on the 0-based iteration t: a cosine restart every P iterations."""
    period = math.ceil(total_steps / cycles)
    return lambda step: alpha0 / 2 * (math.cos(math.pi * (step % period) / period) + 1)


def pre_phase(lr: float, end_lr: float, phase_steps: int) -> Schedule:
    """The SWA paper's schedule before averaging starts: lr for the first half of the phase, then
    linear to end_lr at 90% of it, then end_lr (so the phase hands over smoothly)."""

    def f(step: int) -> float:
        t = step / max(phase_steps, 1)
        if t <= 0.5:
            return lr
        if t >= 0.9:
            return end_lr
        return lr + (end_lr - lr) * (t - 0.5) / 0.4

    return f
