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


TINY_RUN = ["--dataset", "synthetic", "--subset", "128", "--batch-size", "32", "--epochs", "1"]  # seconds on a CPU


def one_line(err: str, *phrases: str) -> None:
    """stderr holds exactly one line, no traceback, and it says every phrase."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(p in lines[0] for p in phrases), lines[0]


def train_runs(folder, *names: str) -> None:
    """Tiny synthetic runs `names` in `folder`, seeds 1, 2, ...: end points for curves, planes and ensembles."""
    from fastflat.cli import main

    for seed, name in enumerate(names, 1):
        assert main(["train", *TINY_RUN, "--seed", str(seed), "--out", str(folder), "--name", name]) == 0
