"""Small helpers shared by the test files (imported as `from helpers import ...`)."""

from fastflat.train import Hooks


class StopAt(Hooks):
    """Simulates Ctrl-C right after optimizer step `step`: the trainer checkpoints, then re-raises."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt
