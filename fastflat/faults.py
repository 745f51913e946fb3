"""Faults that must never cost a run: stop signals honoured between steps, and non-finite values.

    with StopRequests() as stop:        # SIGINT / SIGTERM set stop.requested; the loop checks it
        ...                             # between steps, so no checkpoint holds half a step
    finite_or_raise({"loss": loss, "gradient norm": sq})   # one host sync for all checks

A second signal while a stop is pending raises KeyboardInterrupt at once (the user insists); the
checkpoint on disk is then the last whole one, since every write is atomic.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any

import torch
from torch import Tensor

from fastflat.errors import NonFiniteError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager that turns the first SIGINT/SIGTERM into a flag (main thread only; elsewhere
    signals keep their handlers and KeyboardInterrupt behaves as usual)."""

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal number, once one arrived
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self.requested = signum

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def finite_or_raise(values: dict[str, Tensor], where: str = "") -> None:
    """Raise NonFiniteError naming the first non-finite value; one host sync for all of them."""
    if not values:
        return
    flags = torch.stack([torch.isfinite(v.detach()).all().to(values[next(iter(values))].device)
                         for v in values.values()]).tolist()
    for name, ok in zip(values, flags):
        if not ok:
            raise NonFiniteError(f"non-finite {name}{where}")


def json_safe(value: Any) -> Any:
    """NaN and +-inf become None, recursively, so metrics and summaries stay strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
