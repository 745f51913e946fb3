"""Start a run or continue one: `fastflat.train()` / `fastflat.resume()` and `fastflat train` call these.

    summary = train(load_config(overrides={"method": "sam"}))       # a new run directory, trained to the end
    summary = resume("runs/sam-...")                                 # from its last checkpoint
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fastflat.config import TrainConfig, config_from_dict, lr_owner, to_dict
from fastflat.errors import UserError
from fastflat.loop.assembly import build_trainer, user_inputs
from fastflat.loss.evaluation import resolve_device
from fastflat.loop.steps import Hooks
from fastflat.loop.trainer import Trainer
from fastflat.methods import method_class
from fastflat.ops import dist
from fastflat.runs.listing import default_run_name
from fastflat.runs.rundir import RunDir, load_checkpoint

def train(cfg: TrainConfig, hooks: Hooks | None = None, model: torch.nn.Module | None = None,
          data: Any = None) -> dict[str, Any]:
    """Start a new run in cfg.out / (cfg.name or a generated name) and train it to the end. A start
    that fails (bad budget, missing data, Ctrl-C while loading) leaves no run directory behind.
    `model` / `data` (a (train, test) pair, see fastflat.data.folders) replace cfg.model / cfg.dataset."""
    if model is not None:
        cfg = replace(cfg, model=f"custom:{type(model).__name__}")
    if data is not None:
        cfg = replace(cfg, dataset="custom")
    dist.init_from_env(cfg.device)
    check_distributable(cfg)
    model, data = user_inputs(cfg, model, data, resolve_device(cfg.device))  # before a run directory exists
    name = dist.broadcast_object(cfg.name or default_run_name(cfg))  # one name: the ranks' clocks differ
    run = RunDir.create(cfg.out, name, rank=dist.rank())
    run.path = Path(dist.broadcast_object(str(run.path)))  # rank 0 may have added a -2 suffix
    with run.locked():
        try:
            if cfg.name is None:
                cfg = replace(cfg, name=run.path.name)
            run.write_config(to_dict(cfg))
            trainer = build_trainer(cfg, run, hooks, model=model, data=data)
        except BaseException:
            run.remove_if_unused()
            raise
        return _run_marking_failures(trainer, run)


def resume(run_dir: str | Path, hooks: Hooks | None = None, model: torch.nn.Module | None = None,
           data: Any = None, epochs: int | None = None) -> dict[str, Any]:
    """Continue a run from its last checkpoint, with the config it was started with. Refuses while
    another process trains the same run; clears temporary files that a crash left behind. A run
    started with your own model or data needs them again (a fresh instance of the same module).
    `epochs`: extend the run (a finished one too) to this many epochs, where extension_problem allows."""
    dist.init_from_env()
    run = RunDir.open(run_dir, rank=dist.rank())
    with run.locked():
        run.remove_temporaries()
        state = load_checkpoint(run.checkpoint_path)
        cfg = config_from_dict(state["config"])
        if epochs is not None:
            if (problem := extension_problem(cfg, epochs)) is not None:
                raise UserError(f"{run_dir} cannot be extended: {problem}")
            cfg = replace(cfg, epochs=epochs)
            run.write_config(to_dict(cfg))
            (run.path / "summary.json").unlink(missing_ok=True)  # no longer finished: a new one at the end
        check_distributable(cfg)
        if data is None and cfg.dataset == "custom":
            raise UserError(f"{run_dir} trained on data passed in Python: resume(run, data=(train, test))")
        model, data = user_inputs(cfg, model, data, resolve_device(cfg.device))
        trainer = build_trainer(cfg, run, hooks, resuming=True, model=model, data=data)
        trainer.restore(state)
        run.clear_failed()
        return _run_marking_failures(trainer, run)


def _run_marking_failures(trainer: Trainer, run: RunDir) -> dict[str, Any]:
    """Train to the end; an error (not an interrupt) leaves failed.json saying why, for `fastflat runs`."""
    try:
        return trainer.run_epochs()
    except Exception as e:
        run.mark_failed(e)
        raise


def extension_problem(cfg: TrainConfig, epochs: int) -> str | None:
    """Why `cfg`'s run cannot be extended to `epochs` (None: it can): the method that sets the LR says
    (Method.extension_problem), since extending must not change the LR of a step already taken."""
    if epochs <= cfg.epochs:
        return f"--epochs {epochs} is not more than the run's {cfg.epochs}"
    if cfg.max_steps:
        return "the run was capped by --max-steps"
    return method_class(lr_owner(cfg) or cfg.method).extension_problem(cfg)


def check_distributable(cfg: TrainConfig) -> None:
    """Under torchrun: a global batch the ranks can share (methods that step on the whole set, or give
    every rank the whole batch, need none)."""
    cls = method_class(cfg.method)
    if not dist.active() or cls.whole_set_steps or not cls.splits_data:
        return
    if cfg.batch_size % dist.world_size():
        raise UserError(f"--batch-size {cfg.batch_size} (the global batch) does not split over {dist.world_size()} "
                        f"processes; use a multiple of {dist.world_size()}")
