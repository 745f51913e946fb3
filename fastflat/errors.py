"""Errors that end a command cleanly, each with its exit code in the CLI.

UserError (exit 2): bad input (option, config, dataset, checkpoint, an unwritable run directory);
one line on stderr naming the problem. NonFiniteError (exit 3): training produced NaN/inf; the
last finite checkpoint is kept. Interrupted (exit 130): Ctrl-C or SIGTERM, handled between steps.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class UserError(Exception):
    """Bad input: the message names the problem and, where there is one, the fix."""


class NonFiniteError(Exception):
    """A loss, gradient norm, SAM ascent norm or ES fitness was NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal, honoured between two steps: `saved_step` is the step the
    checkpoint holds, or None when no checkpoint could be written (nothing was trained yet)."""

    def __init__(self, saved_step: int | None):
        super().__init__(saved_step)
        self.saved_step = saved_step


def finite_or_raise(values: dict[str, Tensor], where: str = "") -> None:
    """Raise NonFiniteError naming the first non-finite value; one host sync for all of them."""
    if not values:
        return
    flags = torch.stack([torch.isfinite(v.detach()).all().to(values[next(iter(values))].device)
                         for v in values.values()]).tolist()
    for name, ok in zip(values, flags):
        if not ok:
            raise NonFiniteError(f"non-finite {name}{where}")


def nonfinite_entries(state_dict: dict[str, Any]) -> dict[str, int]:
    """Name -> count of NaN/inf values, for every floating tensor of a state_dict (weights and buffers)."""
    floats = {k: v for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point()}
    if not floats:
        return {}
    counts = torch.stack([(~torch.isfinite(v.detach())).sum().cpu() for v in floats.values()]).tolist()  # one sync
    return {name: n for name, n in zip(floats, counts) if n}


def finite_state_or_raise(state_dict: dict[str, Any], source: str) -> None:
    """NonFiniteError (exit 3) naming the tensors of `source` that hold NaN or inf, if any do."""
    bad = nonfinite_entries(state_dict)
    if bad:
        listed = ", ".join(f"{name} ({n} value{'s' * (n > 1)})" for name, n in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise NonFiniteError(f"{source} holds non-finite (NaN or inf) values: {listed}{more}")
