"""The training loop: `train` and `resume` a run (api), the parts built from a config (assembly), the
loop over epochs and steps (trainer, steps), what a method may ask of the run (services), and the
faults it survives (faults); `syncbn` for --sync-bn under torchrun."""

from fastflat.loop.api import resume, train
from fastflat.loop.assembly import build_trainer
from fastflat.loop.steps import Hooks
from fastflat.loop.trainer import Trainer

__all__ = ["Hooks", "Trainer", "build_trainer", "resume", "train"]
