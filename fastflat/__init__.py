"""fastflat: train toward flat minima and build cheap ensembles, with fused Triton kernels.

    flat = fastflat.flatten(model)                                   # one buffer, params as views
    opt = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    fastflat.clip_grad_norm_(model.parameters(), 1.0)
    fastflat.update_bn(loader, model, call_fn=lambda m, batch: m(**batch))   # torch's, with any inputs
    summary = fastflat.train({"method": "sam", "epochs": 3}, model=my_module, data=(train_set, test_set))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastflat.flat import FlatParams, flatten
from fastflat.loss.batchnorm import update_bn
from fastflat.ops.noise import member_noise
from fastflat.optim import SAM, AveragedModel, clip_grad_norm_
from fastflat.optim.msam import MSAM
from fastflat.optim.sam_family import GSAM, WSAM, FriendlySAM, LookSAM
from fastflat.version import __version__

__all__ = ["__version__", "SAM", "GSAM", "MSAM", "WSAM", "FriendlySAM", "LookSAM", "AveragedModel", "FlatParams", "clip_grad_norm_", "flatten", "member_noise", "resume", "train",
           "update_bn"]


def train(config: Any = None, model: Any = None, data: Any = None, hooks: Any = None,
          progress: bool = True) -> dict[str, Any]:
    """Train one run, as `fastflat train` does, and return its summary (the run directory is in
    summary["run_dir"]).

    config: a TrainConfig, a dict of settings (nested {"sam": {"rho": 0.1}} or dotted {"sam.rho": 0.1}),
    a YAML file, or None for the defaults. model: any nn.Module mapping a batch of inputs to logits
    (replaces config's model). data: (train, test), each a torch Dataset of (input, label), a DataLoader,
    or an (inputs, labels) pair of tensors (replaces config's dataset; float inputs are used as given).
    progress: print what `fastflat train` prints (run directory, progress, epoch lines, summary) on stdout;
    False for silence. hooks: a fastflat.loop.Hooks of your own receives the progress instead.
    """
    from fastflat.cli.progress import shown_progress
    from fastflat.config import as_config
    from fastflat.loop import api

    with shown_progress(hooks, progress) as shown:
        return api.train(as_config(config), shown, model=model, data=data)


def resume(run_dir: str | Path, model: Any = None, data: Any = None, hooks: Any = None,
           epochs: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Continue a run from its last checkpoint and return its summary; a run trained on your own
    model or data needs them again (a fresh instance of the same module). `epochs` extends the run."""
    from fastflat.cli.progress import shown_progress
    from fastflat.loop import api

    with shown_progress(hooks, progress) as shown:
        return api.resume(run_dir, shown, model=model, data=data, epochs=epochs)
