"""Small helpers shared by the test files (imported as `from helpers import ...`)."""

import os
import signal

from fastflat.loop.steps import Hooks


def send_sigint() -> None:
    """What Ctrl-C does: SIGINT to this process (the trainer's handler turns it into a stop flag)."""
    os.kill(os.getpid(), signal.SIGINT)


class StopAt(Hooks):
    """Ctrl-C right after optimizer step `step`: the trainer finishes nothing more, checkpoints, stops."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, step, metrics):
        if step == self.step:
            send_sigint()
