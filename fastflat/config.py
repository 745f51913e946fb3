"""Run configuration: frozen dataclasses with defaults and units, read from YAML plus overrides.

    cfg = load_config("sam.yaml", {"epochs": 3, "sam.rho": 0.1})   # CLI options override the file

Unknown keys and bad values raise UserError with one line naming the key and what is allowed.
Method settings live in their own section (`sam:` in YAML, `sam.rho` as an override key).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastflat.errors import UserError

METHODS = ("sgd", "sam", "es", "swa", "sse", "fge", "spartan")  # swa/sse/fge/spartan wrap --inner
INNER_METHODS = ("sgd", "sam")
SCHEDULES = ("constant", "step", "cosine")
AMP_MODES = ("none", "bf16")


@dataclass(frozen=True)
class SAMConfig:
    rho: float = 0.05  # radius of the ascent ball (L2: in weight units; ASAM: relative to |w|)
    norm: str = "l2"  # l2 | linf: the ball's shape
    adaptive: bool = False  # ASAM: scale the ball by |w| (Kwon et al. 2021)
    m: int = 0  # m-sharpness: examples per perturbation; 0 = the whole batch shares one


@dataclass(frozen=True)
class SWAConfig:
    enabled: bool = False  # --swa: average on top of any method (--method swa implies it)
    start: float = 0.75  # averaging starts here: a fraction of the budget if < 1, else an epoch
    lr: float = 0.01  # alpha1: the SWA learning rate (cycle maximum when lr_min is set)
    lr_min: float | None = None  # alpha2: cycle minimum; None = constant lr
    cycle: int = 0  # c: iterations per cycle, average at each cycle's end; 0 = one epoch


@dataclass(frozen=True)
class SSEConfig:
    cycles: int = 2  # M: cosine restarts over the budget, one snapshot at the end of each
    keep: int = 0  # ensemble the last k snapshots; 0 = all


@dataclass(frozen=True)
class FGEConfig:
    pretrain: float = 0.5  # share of the budget spent training before the cycles (0 with --init)
    cycle_epochs: float = 2.0  # c in epochs (rounded to an even number of iterations): one model
    #                            collected in the middle of each cycle; short budgets want short cycles
    lr_max: float = 0.05  # alpha1
    lr_min: float = 0.0005  # alpha2: the LR at collection


@dataclass(frozen=True)
class SpartanConfig:
    mutation: str = "es"  # es (OpenAI-ES update) | grad (random-gradient children, best replaces parent)
    mutate_every: int = 1  # epochs between mutation rounds
    children: int = 16  # K
    noise: str = "normal"  # normal | uniform (U[-1, 1], the article's ES experiment)
    sigma: float = 0.01  # ES noise scale, in weight units
    es_lr: float = 2e-5  # ES step: w += es_lr / (K sigma) sum_k r_k eps_k; with shaped rewards each
    #                      weight moves about es_lr / (sqrt(K) sigma): 5e-4 at the defaults
    antithetic: bool = True  # ES children in +/- pairs sharing one eps_k
    shaping: str = "normalize"  # normalize: (r - mean) / std | ranks: centered ranks in [-0.5, 0.5]
    fitness: str = "loss"  # loss | acc, measured on the evolution split
    evolution_split: float = 0.1  # share of the training set held out for fitness; SGD never sees it
    fitness_examples: int = 2048  # examples of the split scored per round (0 = all of it)
    grad_lr: float = 0.05  # grad mutation: child = w - grad_lr * T * u * g, u ~ U(0, 1) per weight
    temperature: float = 1.0  # T0; T = T0 * parent_loss / first_parent_loss (shrinks as it improves)
    chunk: int = 8  # children evaluated at once with torch.func.vmap (1 = one at a time)


@dataclass(frozen=True)
class TrainConfig:
    method: str = "sgd"  # one of METHODS
    inner: str = "sgd"  # the method swa/sse/fge wrap: sgd | sam
    init: str | None = None  # start from this run directory's checkpoint (FGE from a trained model)
    model: str = "cnn"  # see fastflat.models.MODELS
    dataset: str = "fashion-mnist"  # see fastflat.data.DATASETS
    data_dir: str | None = None  # where the dataset files are; None = the usual places
    label_noise: float = 0.0  # fraction of training labels replaced by another class, fixed by seed
    val_split: float = 0.0  # share of the training set held out for validation (choosing a snapshot
    #                         ensemble's k, or a best member, without the test set); training never sees it
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # L2 coupled into the gradient, as torch.optim.SGD does
    schedule: str = "cosine"  # constant | step (x0.1 at 50% and 75%) | cosine (to 0)
    warmup_epochs: float = 0.0  # linear warmup from 0 to lr, before the schedule
    clip_grad: float | None = None  # global L2 norm limit on the gradient; None = no clipping
    amp: str = "none"  # none | bf16 (autocast forward/backward; weights stay fp32)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str = "runs"  # parent folder of the run directory
    name: str | None = None  # run directory name; None = method-dataset-model-seed-time
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch; 0 = epoch ends only
    sam: SAMConfig = field(default_factory=SAMConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    sse: SSEConfig = field(default_factory=SSEConfig)
    fge: FGEConfig = field(default_factory=FGEConfig)
    spartan: SpartanConfig = field(default_factory=SpartanConfig)


def _check(cfg: TrainConfig) -> None:
    """Value checks: each failure names the key, the value, and what is allowed."""
    from fastflat.data import DATASETS

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise UserError(f"{key} = {value!r} is invalid: {allowed}")

    need(cfg.method in METHODS, "method", cfg.method, f"use one of {', '.join(METHODS)}")
    need(cfg.dataset in DATASETS, "dataset", cfg.dataset, f"use one of {', '.join(DATASETS)}")
    need(cfg.schedule in SCHEDULES, "schedule", cfg.schedule, f"use one of {', '.join(SCHEDULES)}")
    need(cfg.amp in AMP_MODES, "amp", cfg.amp, f"use one of {', '.join(AMP_MODES)}")
    need(cfg.epochs >= 1, "epochs", cfg.epochs, "must be at least 1")
    need(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be at least 1")
    need(cfg.lr > 0, "lr", cfg.lr, "must be > 0")
    need(0 <= cfg.momentum < 1, "momentum", cfg.momentum, "must be in [0, 1)")
    need(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "must be >= 0")
    need(cfg.warmup_epochs >= 0, "warmup_epochs", cfg.warmup_epochs, "must be >= 0")
    need(0 <= cfg.label_noise < 1, "label_noise", cfg.label_noise, "must be in [0, 1)")
    need(0 <= cfg.val_split < 1, "val_split", cfg.val_split, "must be in [0, 1) (0 = no validation split)")
    need(cfg.clip_grad is None or cfg.clip_grad > 0, "clip_grad", cfg.clip_grad, "must be > 0")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "must be >= 0")
    need(not cfg.nesterov or cfg.momentum > 0, "nesterov", cfg.nesterov, "needs momentum > 0")
    need(cfg.sam.rho >= 0, "sam.rho", cfg.sam.rho, "must be >= 0")
    need(cfg.sam.norm in ("l2", "linf"), "sam.norm", cfg.sam.norm, "use l2 or linf")
    need(cfg.sam.m >= 0, "sam.m", cfg.sam.m, "must be >= 0 (0 = whole batch)")
    need(cfg.inner in INNER_METHODS, "inner", cfg.inner, f"use one of {', '.join(INNER_METHODS)}")
    need(cfg.swa.start > 0, "swa.start", cfg.swa.start, "a fraction in (0, 1) or an epoch >= 1")
    need(cfg.swa.start < 1 or cfg.swa.start <= cfg.epochs, "swa.start", cfg.swa.start, f"must be <= epochs ({cfg.epochs})")
    need(cfg.swa.lr > 0, "swa.lr", cfg.swa.lr, "must be > 0")
    need(cfg.swa.lr_min is None or 0 < cfg.swa.lr_min <= cfg.swa.lr, "swa.lr_min", cfg.swa.lr_min, "must be in (0, swa.lr]")
    need(cfg.swa.cycle >= 0, "swa.cycle", cfg.swa.cycle, "must be >= 0 (0 = one epoch)")
    need(cfg.sse.cycles >= 1, "sse.cycles", cfg.sse.cycles, "must be at least 1")
    need(cfg.sse.keep >= 0, "sse.keep", cfg.sse.keep, "must be >= 0 (0 = all)")
    need(0 <= cfg.fge.pretrain < 1, "fge.pretrain", cfg.fge.pretrain, "must be in [0, 1)")
    need(cfg.fge.cycle_epochs > 0, "fge.cycle_epochs", cfg.fge.cycle_epochs, "must be > 0")
    need(0 < cfg.fge.lr_min <= cfg.fge.lr_max, "fge.lr_min", cfg.fge.lr_min, "must be in (0, fge.lr_max]")
    sp = cfg.spartan
    need(sp.mutation in ("es", "grad"), "spartan.mutation", sp.mutation, "use es or grad")
    need(sp.mutate_every >= 1, "spartan.mutate_every", sp.mutate_every, "must be at least 1")
    need(sp.children >= 2 and (not sp.antithetic or sp.children % 2 == 0), "spartan.children", sp.children,
         "must be >= 2, and even with antithetic sampling")
    need(sp.noise in ("normal", "uniform"), "spartan.noise", sp.noise, "use normal or uniform")
    for key in ("sigma", "es_lr", "grad_lr", "temperature"):
        need(getattr(sp, key) > 0, f"spartan.{key}", getattr(sp, key), "must be > 0")
    need(sp.shaping in ("normalize", "ranks"), "spartan.shaping", sp.shaping, "use normalize or ranks")
    need(sp.fitness in ("loss", "acc"), "spartan.fitness", sp.fitness, "use loss or acc")
    need(0 < sp.evolution_split < 1 or cfg.method not in ("spartan",), "spartan.evolution_split", sp.evolution_split, "must be in (0, 1)")
    need(sp.fitness_examples >= 0 and sp.chunk >= 1, "spartan.chunk", sp.chunk, "chunk >= 1, fitness_examples >= 0")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise UserError naming the key."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError
        return hint(value)
    except (TypeError, ValueError):
        raise UserError(f"{key} = {value!r} is invalid: expected {hint.__name__}") from None


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown config key {prefix + unknown[0]!r}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{prefix + name} must be a mapping of its settings, got {value!r}")
            kwargs[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, hint)
    return cls(**kwargs)


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"sam.rho": 0.1} -> {"sam": {"rho": 0.1}}; None values mean 'not given' and are dropped."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = key.replace("-", "_").split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides (dotted keys), then checked."""
    values = read_yaml(path) if path else {}
    values = _merge(_nest({k: v for k, v in values.items()}), _nest(overrides or {}))
    cfg = _build(TrainConfig, values)
    _check(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by `to_dict` (checkpoints, config.yaml)."""
    cfg = _build(TrainConfig, values)
    _check(cfg)
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
