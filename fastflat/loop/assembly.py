"""Everything a run trains on, built from its config before the loop starts: the data (validation and
method holdouts split off, subset taken, the method's own preparation), the model on its device, the
flat buffer, the method, and the services the method may call.

    trainer = build_trainer(cfg, RunDir.create("runs", "try"))     # then trainer.run_epochs()

`Trainer` receives these parts and assembles nothing; a test or a benchmark builds them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from fastflat import data as datasets
from fastflat.config import TrainConfig
from fastflat.data.models import build_model
from fastflat.errors import UserError
from fastflat.flat import FlatParams, flatten
from fastflat.loop.services import Services
from fastflat.loop.steps import Hooks
from fastflat.loop.trainer import Trainer
from fastflat.loss.evaluation import loss_scaler, resolve_device
from fastflat.methods import Method, build_method
from fastflat.methods.schedules import make_schedule
from fastflat.ops import dist
from fastflat.runs.rundir import RunDir, load_checkpoint, load_weights


@dataclass
class RunData:
    """The splits a run uses: `data.train` is what the optimizer sees (after every hold-out and subset)."""

    data: datasets.Dataset
    validation: datasets.Split | None  # --val-split, never trained on
    holdouts: dict[str, datasets.Split]  # a method's own held-out splits by purpose (Spartan's evolution split)


def build_data(cfg: TrainConfig, method: Method, device: torch.device, data: Any = None) -> RunData:
    """Load the dataset (or the user's `data` pair), then split off validation, the method's holdout, the subset."""
    if data is not None:  # fastflat.train(..., data=(train, test)): the user's own
        from fastflat.data.folders import from_user_data

        loaded = from_user_data(data, device, cfg.label_noise, cfg.seed)
    else:
        loaded = datasets.load_dataset(cfg.dataset, cfg.data_dir, device, cfg.label_noise, cfg.seed,
                                       image_size=cfg.image_size)
    loaded, validation = datasets.hold_out_validation(loaded, cfg.val_split, cfg.seed)
    holdouts: dict[str, datasets.Split] = {}
    if (request := method.holdout()) is not None:  # e.g. Spartan's evolution split
        purpose, fraction = request
        kept, holdouts[purpose] = datasets.split_holdout(loaded.train, fraction, cfg.seed, method.holdout_salt or purpose)
        loaded = replace(loaded, train=kept)
    loaded = replace(loaded, train=datasets.random_subset(loaded.train, cfg.subset, cfg.seed))
    return RunData(method.prepare_data(loaded), validation, holdouts)


def build_model_for(cfg: TrainConfig, data: datasets.Dataset, device: torch.device, model: torch.nn.Module | None,
                    resuming: bool) -> torch.nn.Module:
    """The config's model (or the user's) on `device`, started from --init, converted for --sync-bn."""
    built = (model if model is not None else
             build_model(cfg.model, data.in_channels, data.num_classes, data.image_size)).to(device)
    if cfg.init and not resuming:  # a resumed run has the weights in its checkpoint already
        load_weights(built, load_checkpoint(cfg.init)["model"], f"--init {cfg.init}", cfg.model)
    if cfg.sync_bn and dist.active():
        from fastflat.loop.syncbn import convert

        built = convert(built, device.type == "cuda")
    return built


def steps_per_epoch(cfg: TrainConfig, method: Method, train_size: int) -> int:
    if method.whole_set_steps:
        return 1
    steps = datasets.num_batches(train_size, cfg.batch_size * cfg.accumulate, drop_last=True)
    if steps == 0:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the {train_size} training examples")
    return steps


def build_trainer(cfg: TrainConfig, run: RunDir, hooks: Hooks | None = None, resuming: bool = False,
                  model: torch.nn.Module | None = None, data: Any = None) -> Trainer:
    """Build every part of a run for `cfg`, in the order that keeps runs reproducible (the seed first,
    then the method, data and model), and hand them to a Trainer."""
    device = resolve_device(cfg.device)
    scaler = loss_scaler(device, cfg.amp)  # --amp fp16 only; methods read it from services
    torch.manual_seed(cfg.seed)
    method = build_method(cfg)
    parts = build_data(cfg, method, device, data)
    method.check_data(len(parts.data.train))
    net = build_model_for(cfg, parts.data, device, model, resuming)
    flat: FlatParams = flatten(net)  # after .to(): moving re-creates parameters
    per_epoch = steps_per_epoch(cfg, method, len(parts.data.train))
    services = Services(cfg, run, parts.data, net, flat, device, parts.validation, parts.holdouts,
                        user_model=model, steps_per_epoch=per_epoch, total_steps=cfg.epochs * per_epoch,
                        resuming=resuming, scaler=scaler, hooks=hooks or Hooks())
    method.init(flat, services)  # may refuse a budget that cannot deliver (UserError)
    schedule = make_schedule(cfg.schedule, cfg.lr, services.total_steps, round(cfg.warmup_epochs * per_epoch))
    return Trainer(cfg, run, services, method, schedule)
