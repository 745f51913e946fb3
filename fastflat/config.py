"""Run configuration: the general settings declared here plus each method's own section, taken from the
method classes (fastflat.methods), read from YAML and overrides and checked all at once.

    cfg = load_config("sam.yaml", {"epochs": 3, "sam.rho": 0.1})   # CLI options override the file

Every field carries its help text, choices and option name (fastflat.settings.setting): `fastflat train`
generates its options from them, so help and behaviour cannot drift. Unknown keys and bad values raise
one UserError naming every key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastflat.errors import UserError
from fastflat.methods import inner_names, method_class, registry, sections
from fastflat.methods.optimizers import optimizer_class, optimizer_problem, schedule_free
from fastflat.settings import build, did_you_mean, enum_of, merge, nest, raise_problems, read_yaml, setting

METHOD, OPTIM, DATA, RUN = "Method", "Optimisation", "Data and model", "Run"  # help panels of the general settings
Schedule = enum_of("Schedule", "constant", "step", "cosine")
Amp = enum_of("Amp", "none", "bf16", "fp16")
OnNonFinite = enum_of("OnNonFinite", "raise", "skip", "rollback")
BadImages = enum_of("BadImages", "fail", "skip")
Augment = enum_of("Augment", "auto", "none", "flip", "crop-flip")
MemoryFormat = enum_of("MemoryFormat", "auto", "channels-last", "contiguous")
Dataset = enum_of("Dataset", "fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic")
MethodName = enum_of("Method", *registry())
InnerMethod = enum_of("InnerMethod", *inner_names())
SEED_MAX = 2**32 - 1  # torch's CPU generator keeps 32 bits of a seed; larger ones would collide


@dataclass(frozen=True)
class GeneralConfig:
    """The settings every method shares; TrainConfig adds one section per method that has settings."""

    method: str = setting("sgd", "Training method; swa, sse, fge and spartan wrap --inner.", choices=MethodName, panel=METHOD)
    inner: str = setting("sgd", "Method that swa/sse/fge/spartan wrap.", choices=InnerMethod, panel=METHOD)
    init: str | None = setting(None, "Start from this run directory's checkpoint (e.g. FGE from a trained model).", panel=METHOD)
    model: str = setting("fastcnn", "fastcnn | cnn | resnet18 | preact-resnet18 | wrn-D-K | vgg16-bn | torchvision:NAME | timm:NAME "
                         "(pip install timm).", panel=DATA)
    dataset: str = setting("fashion-mnist", "fashion-mnist | mnist | cifar10 | cifar100 | synthetic (a small fixed 10-class "
                           "set for tests) | folder:PATH (train/ and val/ or test/ class folders).", panel=DATA)
    augment: str = setting("auto", "Training augmentation, drawn afresh each batch: a random horizontal flip, a random "
                           "crop of the image padded by 4 (reflect) and the flip, none, or auto: the dataset's own "
                           "(crop-flip for CIFAR, none for the others).", choices=Augment, panel=DATA)
    memory_format: str = setting("auto", "Conv weights' layout: channels-last (NHWC: convolutions and max-pools ~1.8x "
                                 "faster on a CPU), contiguous (NCHW), or auto: the model's own choice (channels-last "
                                 "for fastcnn, contiguous for the others, as their published figures were made).",
                                 choices=MemoryFormat, panel=DATA)
    image_size: int = setting(32, "folder:PATH datasets: resize images to this side.", panel=DATA)
    bad_images: str = setting("fail", "folder:PATH datasets: an image that does not decode stops the run, listed with "
                              "the others (fail), or is left out with a warning and named in RUN/skipped-images.txt "
                              "(skip).", choices=BadImages, panel=DATA)
    data_dir: str | None = setting(None, "Folder holding the dataset files (default: the usual places).", panel=DATA)
    label_noise: float = setting(0.0, "Fraction of training labels to corrupt, fixed by --seed.", panel=DATA)
    val_split: float = setting(0.0, "Share of training data held out for validation (choose k or a member without the "
                               "test set); training never sees it.", panel=DATA)
    epochs: int = setting(3, "Epochs to train.", panel=OPTIM)
    max_steps: int = setting(0, "Stop after N steps in all: a quick try (the LR schedule still spans --epochs; 0 = no cap).", panel=OPTIM)
    batch_size: int = setting(128, "Examples per step (per accumulated batch with --accumulate; global under torchrun).", panel=OPTIM)
    sync_bn: bool = setting(False, "torchrun: BatchNorm over the global batch, so N ranks train as one process would.", panel=OPTIM)
    accumulate: int = setting(1, "Gradient accumulation: a step averages K batches (SAM ascends with the whole accumulated "
                              "gradient).", panel=OPTIM)
    optimizer: str = setting("sgd", "Base optimizer every method steps with: sgd | adamw | adam | any torch.optim class "
                             "by name (rmsprop, nadam, ...) | module:Class | schedulefree-sgd | schedulefree-adamw "
                             "(pip install schedulefree; with --schedule constant).", panel=OPTIM)
    lr: float = setting(0.2, "Peak learning rate.", panel=OPTIM)
    momentum: float = setting(0.9, "Momentum (SGD, RMSprop: optimizers that take one).", panel=OPTIM)
    nesterov: bool = setting(True, "Nesterov momentum (SGD; --no-nesterov for plain momentum).", panel=OPTIM)
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam-family betas, as beta1,beta2.", panel=OPTIM)
    weight_decay: float = setting(5e-4, "Weight decay: added to the gradient (sgd, adam, ...), decoupled for adamw.",
                                  panel=OPTIM)
    decay_norm_bias: bool = setting(True, "Decay normalization and bias parameters too; --no-decay-norm-bias exempts "
                                    "every 1-D parameter (timm's habit).", panel=OPTIM)
    schedule: str = setting("cosine", "LR schedule: constant | step (x0.1 at 50% and 75%) | cosine (to 0); methods that own "
                            "their LR (swa, sse, fge) refuse it.", choices=Schedule, panel=OPTIM)
    warmup_epochs: float = setting(0.0, "Linear LR warmup from 0, in epochs, before the schedule.", panel=OPTIM)
    label_smoothing: float = setting(0.0, "Train on targets smoothed by this much (torch's label_smoothing); scores stay "
                                     "plain cross-entropy and accuracy.", panel=OPTIM)
    clip_grad: float | None = setting(None, "Clip the gradient to this global L2 norm (unset: no clipping).", panel=OPTIM)
    amp: str = setting("none", "Mixed precision: bf16 autocast; fp16 autocast with a loss scale (CUDA). Weights stay fp32.",
                       choices=Amp, panel=OPTIM)
    on_nonfinite: str = setting("raise", "NaN/inf loss or gradient: stop (exit 3, last finite checkpoint kept), skip the "
                                "step, or roll back with half the LR.", choices=OnNonFinite, panel=RUN)
    seed: int = setting(0, "Random seed (init, batch order, label noise), 0 .. 2^32 - 1.", panel=RUN)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N.", panel=RUN)
    out: str = setting("runs", "Parent folder of the run directory.", panel=RUN)
    name: str | None = setting(None, "Run directory name (default: method-dataset-model-seed-time).", panel=RUN)
    checkpoint_every: int = setting(0, "Also checkpoint every N steps (0 = each epoch).", panel=RUN)
    eval_every: int = setting(1, "Evaluate and checkpoint every N epochs (full batch: steps), and after the last.", panel=RUN)
    subset: int = setting(0, "Train on a seeded random N training examples (0 = all).", panel=DATA)
    test_subset: int = setting(0, "Score on a seeded random N test examples (0 = all): quicker tries; the summary's "
                               "test_examples says how many.", panel=DATA)
    trajectory_every: int = setting(0, "Save the weights every N steps to trajectory/ (for fastflat landscape plane "
                                    "--trajectory; 0 = never).", panel=RUN)
    log_every: int = setting(50, "A line of steps.jsonl (and steps.csv) every N steps, at least 10 a run: loss, accuracy, lr (0 = epochs only).", panel=RUN)
    tensorboard: bool = setting(False, "Also write TensorBoard scalars to RUN/tensorboard (pip install tensorboard).", panel=RUN)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(f.name, f.type, f) for f in dataclasses.fields(GeneralConfig)]
    + [(section, cls, field(default_factory=cls)) for section, cls in sections().items()],
    frozen=True)
TrainConfig.__module__ = __name__  # where typing.get_type_hints resolves the general fields' annotations
TrainConfig.__doc__ = "Every setting of a run: GeneralConfig's fields, then one section per method (cfg.sam.rho)."


def config_fields(cls: type = TrainConfig, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type hint) of every leaf setting, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from config_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name]


def option_keys() -> dict[str, str]:
    """CLI option name (underscores) -> dotted config key, derived from the dataclasses: a top-level
    field keeps its name, a section's field is `section_field` unless its metadata names the option."""
    return {f.metadata.get("option", key.replace(".", "_")): key for key, f, _ in config_fields()}


def value_of(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check(cfg: Any) -> list[str]:
    """Value checks; returns every failure, each naming the key, the value, and what is allowed."""
    problems: list[str] = []
    reported: set[str] = set()  # one problem per key: the first says what is wrong with it

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok and key not in reported:
            reported.add(key)
            problems.append(f"{key} = {value_of(cfg, key)!r} is invalid: {allowed}")

    for key, f, _ in config_fields():  # generic: closed choices, finite numbers
        value = value_of(cfg, key)
        if (values := f.metadata.get("choices")) is not None and value not in values.values():
            hint_bool = " (YAML reads an unquoted no/off/yes/on as a boolean: quote it)" if isinstance(value, bool) else ""
            need(False, key, f"use one of {', '.join(values.values())}{hint_bool}{did_you_mean(value, values.values())}")
        elif isinstance(value, float) and not math.isfinite(value):
            need(False, key, "must be a finite number")
    _check_general(cfg, need)
    for section in sections():  # each section's own ranges (its dataclass's check), whichever method runs
        settings = getattr(cfg, section)
        if hasattr(settings, "check"):
            settings.check(cfg, lambda ok, key, allowed, s=section: need(ok, f"{s}.{key}", allowed))
    if cfg.method in registry():
        _check_method_facts(cfg, need)
    return problems


def _check_general(cfg: Any, need: Any) -> None:
    need(0 <= cfg.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}]")
    need(cfg.epochs >= 1, "epochs", "must be at least 1")
    need(cfg.dataset in Dataset.values() or cfg.dataset.startswith("folder:") or cfg.dataset == "custom", "dataset",
         f"use one of {', '.join(Dataset.values())}, or folder:PATH for an ImageFolder tree")
    need(cfg.image_size >= 8, "image_size", "must be at least 8")
    need(cfg.max_steps >= 0, "max_steps", "must be >= 0 (0 = no cap)")
    need(cfg.batch_size >= 1, "batch_size", "must be at least 1")
    need(cfg.accumulate >= 1, "accumulate", "must be at least 1 (1 = no accumulation)")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)")
    need(all(0 <= b < 1 for b in cfg.betas), "betas", "each in [0, 1), as beta1,beta2 (e.g. 0.9,0.999)")
    need(optimizer_problem(cfg.optimizer) is None, "optimizer", optimizer_problem(cfg.optimizer) or "")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(cfg.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
    need(0.0 <= cfg.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
    need(0 <= cfg.label_noise < 1, "label_noise", "must be in [0, 1)")
    need(0 <= cfg.val_split < 1, "val_split", "must be in [0, 1) (0 = no validation split)")
    need(cfg.clip_grad is None or cfg.clip_grad > 0, "clip_grad", "must be > 0")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
    need(not cfg.nesterov or cfg.momentum > 0, "nesterov", "needs momentum > 0")
    need(cfg.eval_every >= 1, "eval_every", "must be at least 1")
    need(cfg.subset >= 0, "subset", "must be >= 0 (0 = the whole training set)")
    need(cfg.test_subset >= 0, "test_subset", "must be >= 0 (0 = the whole test set)")
    need(cfg.trajectory_every >= 0, "trajectory_every", "must be >= 0 (0 = no trajectory)")
    need(cfg.log_every >= 0, "log_every", "must be >= 0 (0 = per epoch only)")


def _check_method_facts(cfg: Any, need: Any) -> None:
    """What the chosen method (and the one it wraps) says it can do, asked of its class."""
    chosen = [method_class(cfg.method)] + ([method_class(cfg.inner)] if method_class(cfg.method).wraps else [])
    unbatched = ", ".join(n for n, c in registry().items() if not c.batched)
    need(cfg.accumulate == 1 or all(c.batched for c in chosen), "accumulate",
         f"applies to gradient methods with batches (not {unbatched})")
    steps = [n for n, c in registry().items() if c.fp16 and not c.wraps]
    wrappers = "/".join(n for n, c in registry().items() if c.fp16 and c.wraps)
    need(cfg.amp != "fp16" or all(c.fp16 for c in chosen), "amp",
         f"fp16 (a loss-scaled gradient) applies to {' and '.join([', '.join(steps[:-1]), steps[-1]] if len(steps) > 1 else steps)}"
         f", and {wrappers} over them; use bf16 for --method {cfg.method}")
    refusal = method_class(cfg.method).swa_refusal
    need(not cfg.swa.enabled or refusal is None, "swa.enabled", f"--swa cannot average --method {cfg.method}: {refusal}")
    added = {name: on for name, on in (("swa", cfg.swa.enabled), ("ema", cfg.ema.decay > 0), ("lawa", cfg.lawa.k > 0))}
    for name in ("ema", "lawa"):
        average_refusal = next((c.average_refusal for c in chosen if c.average_refusal), None)
        need(not added[name] or average_refusal is None, f"{name}",
             f"--{name} cannot average --method {cfg.method}: {average_refusal}")
    averages = sorted({name for name, on in added.items() if on} | {c.name for c in chosen if c.averages})
    need(len(averages) <= 1, averages[-1] if averages else "swa",
         f"{' and '.join(averages)} each deliver an average as the run's model: use one of them")
    if optimizer_problem(cfg.optimizer) is None and schedule_free(optimizer_class(cfg.optimizer)):
        _schedule_free_facts(cfg, chosen, averages, need)
    for cls in chosen:
        cls.check_config(cfg, need)


def _schedule_free_facts(cfg: Any, chosen: list[type], averages: list[str], need: Any) -> None:
    """A schedule-free optimizer trains at y and delivers its average x, with no LR schedule."""
    refusal = next((c.schedule_free_refusal for c in chosen if c.schedule_free_refusal), None)
    need(refusal is None, "optimizer", f"--optimizer {cfg.optimizer} cannot drive --method {cfg.method}: {refusal}")
    need(not averages, "optimizer", f"--optimizer {cfg.optimizer} already delivers an average (its x): not with "
                                    f"{' or '.join(averages)}")
    owner = lr_owner(cfg)
    need(owner is None or owner in averages, "optimizer", f"--method {owner} cycles the learning rate; schedule-free "
                                                          "needs it constant")
    need(cfg.schedule == "constant", "schedule", f"--optimizer {cfg.optimizer} replaces the learning-rate schedule: use "
                                                 "--schedule constant (--warmup-epochs still warms up)")
    need(cfg.decay_norm_bias, "decay_norm_bias", f"--optimizer {cfg.optimizer} applies its weight decay inside its "
                                                 "step: --no-decay-norm-bias cannot mask it")


def lr_owner(cfg: Any) -> str | None:
    """The method that sets the learning rate itself (its own cycle), if any: --method swa|sse|fge, or --swa."""
    if method_class(cfg.method).owns_lr:
        return cfg.method
    return "swa" if cfg.swa.enabled else None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Defaults <- the method's own defaults <- YAML file <- overrides (dotted keys), then checked;
    every problem in one UserError."""
    values = merge(nest(read_yaml(path) if path else {}), nest(overrides or {}))
    chosen = registry().get(str(values.get("method", GeneralConfig.method)))
    defaults = dict(chosen.defaults) if chosen is not None else {}
    if values.get("momentum", GeneralConfig.momentum) in (0, "0", 0.0):
        defaults["nesterov"] = False  # a default must not turn the user's --momentum 0 into an error
    values = merge(defaults, values)  # given values win
    problems: list[str] = []
    cfg = build(TrainConfig, values, problems)
    problems += _check(cfg)
    for name, cls in registry().items():  # settings of a method that only it reads, given for another
        given = values.get(cls.settings_key(), {})
        if given and cls.settings_need_method and cfg.method != name:
            problems.append(f"{cls.settings_key()} settings ({', '.join(sorted(given))}) apply to --method {name} only")
    if cfg.method in registry() and (owner := lr_owner(cfg)):
        for key in ("schedule", "warmup_epochs"):  # the method's own LR would silently replace them
            if key in values:
                problems.append(f"{key} cannot be combined with {owner}: it sets its own learning rate "
                                f"(see --{owner}-* options); drop {key}, or train with --method sgd|sam")
    raise_problems(problems)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Any:
    """Rebuild a config saved by `to_dict` (checkpoints, config.yaml)."""
    problems: list[str] = []
    cfg = build(TrainConfig, values, problems)
    raise_problems(problems + _check(cfg))
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON values: sections as dicts, tuples (betas) as lists."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items})


def as_config(config: Any) -> Any:
    """A TrainConfig from what the Python API accepts: a TrainConfig, a dict of settings, a YAML path, or None."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    if config is not None and not isinstance(config, dict):
        raise UserError(f"config= takes a dict of settings ({{'method': 'sam', 'sam': {{'rho': 0.1}}}}), a YAML file's "
                        f"path or a TrainConfig; got a {type(config).__name__}")
    return load_config(None, dict(config or {}))
