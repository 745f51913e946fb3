"""Stop signals that must never cost a run: honoured between steps, so no checkpoint holds half a step.

    with StopRequests() as stop:        # SIGINT / SIGTERM set stop.requested; the loop checks it
        ...                             # between steps, so no checkpoint holds half a step

A second signal while a stop is pending raises KeyboardInterrupt at once (the user insists); the
checkpoint on disk is then the last whole one, since every write is atomic.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

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
