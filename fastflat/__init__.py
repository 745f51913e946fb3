"""fastflat: train toward flat minima and build cheap ensembles, with fused Triton kernels.

    flat = fastflat.flatten(model)                                   # one buffer, params as views
    opt = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    fastflat.clip_grad_norm_(model.parameters(), 1.0)
    summary = fastflat.train({"method": "sam", "epochs": 3}, model=my_module, data=(train_set, test_set))
"""

from pathlib import Path
from typing import Any


from fastflat.flat import FlatParams, flatten
from fastflat.noise import member_noise
from fastflat.optim import SAM, AveragedModel, clip_grad_norm_

__version__ = "0.1.0"
__all__ = ["SAM", "AveragedModel", "FlatParams", "clip_grad_norm_", "flatten", "member_noise", "train"]


def train(config: Any = None, model: Any = None, data: Any = None, hooks: Any = None) -> dict[str, Any]:
    """Train one run, as `fastflat train` does, and return its summary (the run directory is in
    summary["run_dir"]).

    config: a TrainConfig, a dict of settings (nested {"sam": {"rho": 0.1}} or dotted {"sam.rho": 0.1}),
    a YAML file, or None for the defaults. model: any nn.Module mapping a batch of inputs to logits
    (replaces config's model). data: (train, test), each a torch Dataset of (input, label), a DataLoader,
    or an (inputs, labels) pair of tensors (replaces config's dataset; float inputs are used as given).
    hooks: a fastflat.trainer.Hooks for progress (default: silent).
    """
    from fastflat import trainer
    from fastflat.config import TrainConfig, load_config

    if isinstance(config, TrainConfig):
        cfg = config
    elif isinstance(config, (str, Path)):
        cfg = load_config(config)
    else:
        cfg = load_config(None, dict(config or {}))
    return trainer.train(cfg, hooks, model=model, data=data)
