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
from fastflat.runs.rundir import RunDir, load_point, load_weights


@dataclass
class RunData:
    """The splits a run uses: `data.train` is what the optimizer sees (after every hold-out and subset)."""

    data: datasets.Dataset
    validation: datasets.Split | None  # --val-split, never trained on
    holdouts: dict[str, datasets.Split]  # a method's own held-out splits by purpose (Spartan's evolution split)


def build_data(cfg: TrainConfig, method: Method, device: torch.device, data: Any = None) -> RunData:
    """Load the dataset (or the user's `data` pair), then split off validation, the method's holdout, the subset."""
    if isinstance(data, datasets.Dataset):  # the user's own, converted and checked by user_inputs
        loaded = data
    elif data is not None:  # fastflat.train(..., data=(train, test)): the user's own
        from fastflat.data.folders import from_user_data

        loaded = from_user_data(data, device, cfg.label_noise, cfg.seed)
    else:
        loaded = datasets.load_dataset(cfg.dataset, cfg.data_dir, device, cfg.label_noise, cfg.seed,
                                       image_size=cfg.image_size, bad_images=cfg.bad_images)
    if cfg.augment != "auto":
        if cfg.augment != "none" and loaded.train.images.dim() != 4:
            raise UserError(f"--augment {cfg.augment} flips and crops images (C, H, W); this data holds inputs of "
                            f"shape {tuple(loaded.train.images.shape[1:])}: use --augment none")
        loaded = replace(loaded, augment=cfg.augment.replace("-", "_"))
    loaded, validation = datasets.hold_out_validation(loaded, cfg.val_split, cfg.seed)
    holdouts: dict[str, datasets.Split] = {}
    if (request := method.holdout()) is not None:  # e.g. Spartan's evolution split
        purpose, fraction = request
        kept, holdouts[purpose] = datasets.split_holdout(loaded.train, fraction, cfg.seed, method.holdout_salt or purpose)
        loaded = replace(loaded, train=kept)
    loaded = take_subsets(loaded, cfg, " after the held-out splits" if validation is not None or holdouts else "")
    return RunData(method.prepare_data(loaded), validation, holdouts)


def take_subsets(loaded: datasets.Dataset, cfg: TrainConfig, held: str = "") -> datasets.Dataset:
    """--subset and --test-subset: seeded random subsets of the training and test examples (0: all of them);
    `held` says what was split off the training examples before, for the error."""
    if cfg.subset > len(loaded.train):
        raise UserError(f"--subset {cfg.subset} is more than the {len(loaded.train)} training examples{held}: "
                        f"use at most {len(loaded.train)}, or 0 for all of them")
    loaded = replace(loaded, train=datasets.random_subset(loaded.train, cfg.subset, cfg.seed))
    if cfg.test_subset > len(loaded.test):
        raise UserError(f"--test-subset {cfg.test_subset} is more than the {len(loaded.test)} test examples: use at most "
                        f"{len(loaded.test)}, or 0 for all of them")
    return replace(loaded, test=datasets.random_subset(loaded.test, cfg.test_subset, cfg.seed))


def user_inputs(cfg: TrainConfig, model: Any, data: Any, device: torch.device) -> tuple[Any, datasets.Dataset | None]:
    """The Python API's model= and data=, checked before any run directory exists: a module (not a name),
    data the model can take (a probe forward of two examples, eval mode: no BatchNorm statistic moves),
    logits for every class the labels name. Returns (model, data converted to a Dataset, or None)."""
    from fastflat.data.folders import from_user_data

    if model is not None and not isinstance(model, torch.nn.Module):
        raise UserError(f"model= takes a torch.nn.Module, got {type(model).__name__} {model!r:.40}; a built-in model "
                        "is chosen by name in the config: fastflat.train({'model': 'cnn'})")
    if data is None:
        return model, None
    loaded = from_user_data(data, device, cfg.label_noise, cfg.seed)
    if model is None:
        if loaded.train.images.dim() != 4:
            raise UserError(f"data= holds inputs of shape {tuple(loaded.train.images.shape[1:])} per example; the built-in "
                            "models take images (C, H, W): pass your own nn.Module as model=")
        return model, loaded
    x, _ = next(iter(datasets.iterate_batches(datasets.Split(loaded.train.images[:2], loaded.train.labels[:2]), 2,
                                             dataset=loaded, train=False)))
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.to(device).eval()(x)
    except Exception as e:  # the user's forward pass: whatever it raises, say which argument does not fit
        raise UserError(f"model= cannot take the inputs of data= (shape {tuple(x.shape)}): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(x):
        raise UserError(f"model= must return logits of shape (batch, classes); for a batch of {len(x)} it returned "
                        f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.shape[1] < loaded.num_classes:
        raise UserError(f"data= labels go up to {loaded.num_classes - 1} but model= returns {logits.shape[1]} logits: "
                        f"give the model {loaded.num_classes} outputs, or labels 0..{logits.shape[1] - 1}")
    return model, loaded


def build_model_for(cfg: TrainConfig, data: datasets.Dataset, device: torch.device, model: torch.nn.Module | None,
                    resuming: bool) -> torch.nn.Module:
    """The config's model (or the user's) on `device`, started from --init, converted for --sync-bn."""
    built = (model if model is not None else
             build_model(cfg.model, data.in_channels, data.num_classes, data.image_size)).to(device)
    if cfg.init and not resuming:  # a resumed run has the weights in its checkpoint already
        load_weights(built, load_point(cfg.init)["model"], f"--init {cfg.init}", cfg.model)
    if cfg.sync_bn and dist.active():
        from fastflat.loop.syncbn import convert

        built = convert(built, device.type == "cuda")
    return built


def channels_last(cfg: TrainConfig, model: torch.nn.Module) -> bool:
    """Whether the run lays its conv weights out channels_last: --memory-format, or with auto the model's
    `preferred_memory_format` attribute (fastcnn sets it; others keep NCHW, so their results stay as published)."""
    if cfg.memory_format != "auto":
        return cfg.memory_format == "channels-last"
    return getattr(model, "preferred_memory_format", None) == torch.channels_last


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
    flat: FlatParams = flatten(net, channels_last(cfg, net))  # after .to(): moving re-creates parameters
    per_epoch = steps_per_epoch(cfg, method, len(parts.data.train))
    services = Services(cfg, run, parts.data, net, flat, device, parts.validation, parts.holdouts,
                        user_model=model, steps_per_epoch=per_epoch, total_steps=cfg.epochs * per_epoch,
                        resuming=resuming, scaler=scaler, hooks=hooks or Hooks())
    method.init(flat, services)  # may refuse a budget that cannot deliver (UserError)
    schedule = make_schedule(cfg.schedule, cfg.lr, services.total_steps, round(cfg.warmup_epochs * per_epoch))
    return Trainer(cfg, run, services, method, schedule)
