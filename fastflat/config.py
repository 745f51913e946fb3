"""Run configuration: frozen dataclasses with defaults and units, read from YAML plus overrides.

    cfg = load_config("sam.yaml", {"epochs": 3, "sam.rho": 0.1})   # CLI options override the file

Unknown keys and bad values raise UserError with one line naming the key and what is allowed.
Method settings live in their own section (`sam:` in YAML, `sam.rho` as an override key).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastflat.settings import Choice, build, merge, nest, raise_problems, read_yaml


Method = Choice("Method", {m: m for m in ("sgd", "sam", "es", "fullbatch", "swa", "sse", "fge", "spartan", "curve")})
InnerMethod = Choice("InnerMethod", {m: m for m in ("sgd", "sam")})
Schedule = Choice("Schedule", {m: m for m in ("constant", "step", "cosine")})
Amp = Choice("Amp", {m: m for m in ("none", "bf16", "fp16")})
OnNonFinite = Choice("OnNonFinite", {m: m for m in ("raise", "skip", "rollback")})
Dataset = Choice("Dataset", {m: m for m in ("fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic")})
SAMNorm = Choice("SAMNorm", {m: m for m in ("l2", "linf")})
Mutation = Choice("Mutation", {m: m for m in ("es", "grad")})
Noise = Choice("Noise", {m: m for m in ("normal", "uniform")})
Shaping = Choice("Shaping", {m: m for m in ("normalize", "ranks")})
Fitness = Choice("Fitness", {m: m for m in ("loss", "acc")})
GradReg = Choice("GradReg", {m: m for m in ("off", "finite", "exact")})
CurveKind = Choice("CurveKind", {m: m for m in ("bezier", "polychain")})

METHODS, INNER_METHODS, SCHEDULES, AMP_MODES = Method.values(), InnerMethod.values(), Schedule.values(), Amp.values()
LR_OWNERS = ("swa", "sse", "fge")  # methods that set the learning rate themselves
METHOD_DEFAULTS = {"fullbatch": {"nesterov": True}}  # the paper's GD: momentum 0.9, Nesterov, wd 5e-4
SEED_MAX = 2**32 - 1  # torch's CPU generator keeps 32 bits of a seed; larger ones would collide


def choice(default: str, values: type[Choice], option: str | None = None) -> Any:
    """A str field restricted to `values` (checked, and shown as choices by the CLI)."""
    return field(default=default, metadata={"choices": values, **({"option": option} if option else {})})


def option(default: Any, name: str) -> Any:
    """A field whose CLI option is `--name` instead of the derived `--section-field`."""
    return field(default=default, metadata={"option": name})


@dataclass(frozen=True)
class SAMConfig:
    rho: float = option(0.05, "rho")  # radius of the ascent ball (L2: in weight units; ASAM: relative to |w|)
    norm: str = choice("l2", SAMNorm)  # l2 | linf: the ball's shape
    adaptive: bool = False  # ASAM: scale the ball by |w| (Kwon et al. 2021)
    m: int = 0  # m-sharpness: examples per perturbation; 0 = the whole batch shares one
    sync_ascent: bool = option(False, "sam_sync_ascent")  # torchrun: ascend with the all-reduced gradient, not each rank's own


@dataclass(frozen=True)
class SWAConfig:
    enabled: bool = option(False, "swa")  # --swa: average on top of any method (--method swa implies it)
    start: float = 0.75  # averaging starts here: a fraction of the budget if < 1, else an epoch
    lr: float = 0.01  # alpha1: the SWA learning rate (cycle maximum when lr_min is set)
    lr_min: float | None = None  # alpha2: cycle minimum; None = constant lr
    cycle: int = 0  # c: iterations per cycle, average at each cycle's end; 0 = a quarter epoch


@dataclass(frozen=True)
class SSEConfig:
    cycles: int = 2  # M: cosine restarts over the budget, one snapshot at the end of each
    keep: int | str = 0  # ensemble the last k snapshots; 0 = all; "auto" = the k best on --val-split


@dataclass(frozen=True)
class FGEConfig:
    pretrain: float = 0.5  # share of the budget spent training before the cycles (0 with --init)
    cycle_epochs: float = 0.5  # c in epochs (rounded to an even number of iterations): one model
    #                            collected in the middle of each cycle; short budgets want short cycles
    lr_max: float = 0.05  # alpha1
    lr_min: float = 0.0005  # alpha2: the LR at collection


@dataclass(frozen=True)
class SpartanConfig:
    mutation: str = choice("es", Mutation, "mutation")  # es (OpenAI-ES update) | grad (random-gradient children, best replaces parent)
    mutate_every: int = option(1, "mutate_every")  # epochs between mutation rounds
    children: int = option(16, "children")  # K
    noise: str = choice("normal", Noise, "es_noise")  # normal | uniform (U[-1, 1], the article's ES experiment)
    sigma: float = option(0.01, "sigma")  # ES noise scale, in weight units
    es_lr: float = option(2e-5, "es_lr")  # ES step: w += es_lr / (K sigma) sum_k r_k eps_k; with shaped rewards each
    #                      weight moves about es_lr / (sqrt(K) sigma): 5e-4 at the defaults
    antithetic: bool = option(True, "antithetic")  # ES children in +/- pairs sharing one eps_k
    shaping: str = choice("normalize", Shaping, "shaping")  # normalize: (r - mean) / std | ranks: centered ranks in [-0.5, 0.5]
    fitness: str = choice("loss", Fitness, "fitness")  # loss | acc, measured on the evolution split
    evolution_split: float = option(0.1, "evolution_split")  # share of the training set held out for fitness; SGD never sees it
    fitness_examples: int = option(2048, "fitness_examples")  # examples of the split scored per round (0 = all of it)
    grad_lr: float = option(0.05, "grad_lr")  # grad mutation: child = w - grad_lr * T * u * g, u ~ U(0, 1) per weight
    temperature: float = option(1.0, "temperature")  # T0; T = T0 * parent_loss / first_parent_loss (shrinks as it improves)
    chunk: int = option(8, "chunk")  # children evaluated at once with torch.func.vmap (1 = one at a time)


@dataclass(frozen=True)
class FullBatchConfig:
    """Full-batch GD with an explicit gradient-norm penalty (Geiping et al. 2022, "Stochastic training is
    not necessary for generalization"): one step = one pass over the training set."""

    chunk_size: int = option(1024, "chunk_size")  # examples per forward/backward chunk: memory, not result
    gradreg: str = choice("off", GradReg, "gradreg")  # penalty (tau/4)||grad L||^2: off | finite | exact
    strength: float = option(0.5, "gradreg_strength")  # s: tau = s * lr / 2, i.e. the update adds
    #                    (lr/4) s H g, the reference code's rule (its block_strength, 0.5 in its tables)
    tau: float | None = option(None, "tau")  # set tau itself instead of tying it to the step size
    eps: float = option(0.01, "gradreg_eps")  # finite-difference step along g/||g||, in weight units
    block: int = option(0, "gradreg_block")  # b: penalty per block of b examples, averaged; 0 = whole set
    shuffle: bool = option(False, "shuffle_blocks")  # re-draw which examples form the blocks every step
    fixed_augment: int = option(0, "fixed_augment")  # K > 0: K augmented copies made once; none after


@dataclass(frozen=True)
class CurveConfig:
    """A mode-connecting curve (Garipov et al. 2018) between two trained solutions: --method curve
    trains the bend theta; the end points stay fixed. `fastflat curve` fills these in."""

    start: str | None = option(None, "curve_start")  # w1: a run directory or member file
    end: str | None = option(None, "curve_end")  # w2: same architecture and dataset
    kind: str = choice("bezier", CurveKind, "curve_kind")  # bezier | polychain


@dataclass(frozen=True)
class TrainConfig:
    method: str = choice("sgd", Method)  # swa/sse/fge/spartan wrap `inner`
    inner: str = choice("sgd", InnerMethod)  # the method swa/sse/fge/spartan wrap
    init: str | None = None  # start from this run directory's checkpoint (FGE from a trained model)
    model: str = "cnn"  # see fastflat.data.models.MODELS
    dataset: str = "fashion-mnist"  # a built-in set, or folder:PATH (an ImageFolder tree with train/ and val/ or test/)
    image_size: int = 32  # folder:PATH only: images are resized to this side
    data_dir: str | None = None  # where the dataset files are; None = the usual places
    label_noise: float = 0.0  # fraction of training labels replaced by another class, fixed by seed
    val_split: float = 0.0  # share of the training set held out for validation (choosing a snapshot
    #                         ensemble's k, or a best member, without the test set); training never sees it
    epochs: int = 2
    max_steps: int = 0  # stop after N steps in all (a quick try; the LR schedule still spans `epochs`); 0 = no cap
    batch_size: int = 128
    sync_bn: bool = False  # torchrun: BatchNorm statistics over the global batch (timm's --sync-bn); no-op alone
    accumulate: int = 1  # gradient accumulation: a step averages K batches of batch_size (K x batch_size examples)
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # L2 coupled into the gradient, as torch.optim.SGD does
    schedule: str = choice("cosine", Schedule)  # constant | step (x0.1 at 50% and 75%) | cosine (to 0)
    warmup_epochs: float = 0.0  # linear warmup from 0 to lr, before the schedule
    clip_grad: float | None = None  # global L2 norm limit on the gradient; None = no clipping
    amp: str = choice("none", Amp)  # none | bf16 | fp16 (autocast; weights stay fp32; fp16 adds a loss scale, CUDA)
    on_nonfinite: str = choice("raise", OnNonFinite)  # NaN/inf loss or gradient: raise (stop, exit 3,
    #                     last finite checkpoint kept) | skip (drop that step) | rollback (last checkpoint, LR / 2)
    seed: int = 0  # 0 .. 2^32 - 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str = "runs"  # parent folder of the run directory
    name: str | None = None  # run directory name; None = method-dataset-model-seed-time
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch; 0 = epoch ends only
    eval_every: int = 1  # evaluate (and checkpoint) every N epochs, and after the last; fullbatch: N steps
    subset: int = 0  # train on a seeded random N of the training examples (0 = all of them)
    trajectory_every: int = 0  # save the weights every N steps (and at the start) to trajectory/; 0 = never
    log_every: int = 50  # a line of steps.jsonl (loss, accuracy, lr) every N steps; 0 = epochs only
    tensorboard: bool = False  # also write TensorBoard scalars to tensorboard/ (pip install 'fastflat[tensorboard]')
    sam: SAMConfig = field(default_factory=SAMConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    sse: SSEConfig = field(default_factory=SSEConfig)
    fge: FGEConfig = field(default_factory=FGEConfig)
    spartan: SpartanConfig = field(default_factory=SpartanConfig)
    fullbatch: FullBatchConfig = field(default_factory=FullBatchConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)


def _fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type hint) of every leaf setting, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name]


def option_keys() -> dict[str, str]:
    """CLI option name (underscores) -> dotted config key, derived from the dataclasses: a top-level
    field keeps its name, a section's field is `section_field` unless its metadata names the option."""
    return {f.metadata.get("option", key.replace(".", "_")): key for key, f, _ in _fields(TrainConfig)}


def choices_of(key: str) -> type[Choice] | None:
    return next((f.metadata.get("choices") for k, f, _ in _fields(TrainConfig) if k == key), None)


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check(cfg: TrainConfig) -> list[str]:
    """Value checks; returns every failure, each naming the key, the value, and what is allowed."""
    problems: list[str] = []
    reported: set[str] = set()  # one problem per key: the first says what is wrong with it

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok and key not in reported:
            reported.add(key)
            problems.append(f"{key} = {_value(cfg, key)!r} is invalid: {allowed}")

    for key, f, hint in _fields(TrainConfig):  # generic: closed choices, finite numbers
        value = _value(cfg, key)
        if (values := f.metadata.get("choices")) is not None and value not in values.values():
            hint_bool = " (YAML reads an unquoted no/off/yes/on as a boolean: quote it)" if isinstance(value, bool) else ""
            need(False, key, f"use one of {', '.join(values.values())}{hint_bool}")
        elif isinstance(value, float) and not math.isfinite(value):
            need(False, key, "must be a finite number")
    need(0 <= cfg.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}]")
    need(cfg.epochs >= 1, "epochs", "must be at least 1")
    need(cfg.dataset in Dataset.values() or cfg.dataset.startswith("folder:") or cfg.dataset == "custom", "dataset",
         f"use one of {', '.join(Dataset.values())}, or folder:PATH for an ImageFolder tree")
    need(cfg.image_size >= 8, "image_size", "must be at least 8")
    need(cfg.max_steps >= 0, "max_steps", "must be >= 0 (0 = no cap)")
    need(cfg.batch_size >= 1, "batch_size", "must be at least 1")
    need(cfg.accumulate >= 1, "accumulate", "must be at least 1 (1 = no accumulation)")
    need(cfg.accumulate == 1 or cfg.method not in ("es", "fullbatch"), "accumulate",
         "applies to gradient methods with batches (not es or fullbatch)")
    need(cfg.accumulate == 1 or cfg.sam.m == 0 or cfg.batch_size % cfg.sam.m == 0, "accumulate",
         f"with --sam-m, m must divide --batch-size (each accumulated batch of {cfg.batch_size} holds whole chunks)")
    need(cfg.amp != "fp16" or cfg.method not in ("es", "spartan", "fullbatch", "curve"), "amp",
         f"fp16 (a loss-scaled gradient) applies to sgd and sam, and swa/sse/fge over them; use bf16 for --method {cfg.method}")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(cfg.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
    need(0 <= cfg.label_noise < 1, "label_noise", "must be in [0, 1)")
    need(0 <= cfg.val_split < 1, "val_split", "must be in [0, 1) (0 = no validation split)")
    need(cfg.clip_grad is None or cfg.clip_grad > 0, "clip_grad", "must be > 0")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
    need(not cfg.nesterov or cfg.momentum > 0, "nesterov", "needs momentum > 0")
    need(cfg.sam.rho >= 0, "sam.rho", "must be >= 0")
    need(cfg.sam.m >= 0, "sam.m", "must be >= 0 (0 = whole batch)")
    need(cfg.swa.start > 0, "swa.start", "a fraction in (0, 1) or an epoch >= 1")
    need(cfg.swa.start < 1 or cfg.swa.start <= cfg.epochs, "swa.start", f"must be <= epochs ({cfg.epochs})")
    need(cfg.swa.lr > 0, "swa.lr", "must be > 0")
    need(cfg.swa.lr_min is None or 0 < cfg.swa.lr_min <= cfg.swa.lr, "swa.lr_min", "must be in (0, swa.lr]")
    need(cfg.swa.cycle >= 0, "swa.cycle", "must be >= 0 (0 = a quarter epoch)")
    need(cfg.sse.cycles >= 1, "sse.cycles", "must be at least 1")
    keep = cfg.sse.keep
    need(keep == "auto" or (type(keep) is int and 0 <= keep <= cfg.sse.cycles), "sse.keep",
         f"a count in [0, sse.cycles = {cfg.sse.cycles}] (0 = all), or auto")
    need(keep != "auto" or cfg.val_split > 0, "sse.keep", "auto chooses k on a validation split: add --val-split 0.1")
    need(0 <= cfg.fge.pretrain < 1, "fge.pretrain", "must be in [0, 1)")
    need(cfg.fge.cycle_epochs > 0, "fge.cycle_epochs", "must be > 0")
    need(0 < cfg.fge.lr_min <= cfg.fge.lr_max, "fge.lr_min", "must be in (0, fge.lr_max]")
    sp = cfg.spartan
    need(sp.mutate_every >= 1, "spartan.mutate_every", "must be at least 1")
    need(sp.children >= 2 and (not sp.antithetic or sp.children % 2 == 0), "spartan.children",
         "must be >= 2, and even with antithetic sampling")
    for key in ("sigma", "es_lr", "grad_lr", "temperature"):
        need(getattr(sp, key) > 0, f"spartan.{key}", "must be > 0")
    need(0 < sp.evolution_split < 1 or cfg.method != "spartan", "spartan.evolution_split", "must be in (0, 1)")
    need(sp.fitness_examples >= 0, "spartan.fitness_examples", "must be >= 0 (0 = the whole split)")
    need(sp.chunk >= 1, "spartan.chunk", "must be >= 1")
    need(cfg.eval_every >= 1, "eval_every", "must be at least 1")
    need(cfg.subset >= 0, "subset", "must be >= 0 (0 = the whole training set)")
    need(cfg.trajectory_every >= 0, "trajectory_every", "must be >= 0 (0 = no trajectory)")
    need(cfg.log_every >= 0, "log_every", "must be >= 0 (0 = per epoch only)")
    fb = cfg.fullbatch
    need(fb.chunk_size >= 1, "fullbatch.chunk_size", "must be at least 1")
    need(fb.strength >= 0, "fullbatch.strength", "must be >= 0")
    need(fb.tau is None or fb.tau >= 0, "fullbatch.tau", "must be >= 0")
    need(fb.eps > 0, "fullbatch.eps", "must be > 0")
    need(fb.block >= 0 and (fb.block == 0 or (fb.block <= fb.chunk_size and fb.chunk_size % fb.block == 0)),
         "fullbatch.block", f"must be 0 (the whole set) or divide fullbatch.chunk_size = {fb.chunk_size}")
    need(fb.fixed_augment >= 0, "fullbatch.fixed_augment", "must be >= 0")
    for end in ("start", "end"):
        need(cfg.method != "curve" or bool(getattr(cfg.curve, end)), f"curve.{end}",
             "--method curve needs both end points: --curve-start RUN --curve-end RUN")
    return problems


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides (dotted keys), then checked; every problem in one UserError."""
    values = merge(nest(read_yaml(path) if path else {}), nest(overrides or {}))
    defaults = dict(METHOD_DEFAULTS.get(str(values.get("method", "")), {}))
    if values.get("momentum", TrainConfig.momentum) in (0, "0", 0.0):
        defaults.pop("nesterov", None)  # a default must not turn the user's --momentum 0 into an error
    values = merge(defaults, values)  # given values win
    problems: list[str] = []
    cfg = build(TrainConfig, values, problems)
    problems += _check(cfg)
    owner = cfg.method if cfg.method in LR_OWNERS else ("swa" if cfg.swa.enabled else None)
    given = values.get("fullbatch", {})
    if given and cfg.method != "fullbatch":
        problems.append(f"fullbatch settings ({', '.join(sorted(given))}) apply to --method fullbatch only")
    for key in ("schedule", "warmup_epochs"):  # the method's own LR would silently replace them
        if owner and key in values:
            problems.append(f"{key} cannot be combined with {owner}: it sets its own learning rate "
                            f"(see --{owner}-* options); drop {key}, or train with --method sgd|sam")
    raise_problems(problems)
    return cfg


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by `to_dict` (checkpoints, config.yaml)."""
    problems: list[str] = []
    cfg = build(TrainConfig, values, problems)
    raise_problems(problems + _check(cfg))
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def as_config(config: Any) -> TrainConfig:
    """A TrainConfig from what the Python API accepts: a TrainConfig, a dict of settings, a YAML path, or None."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    return load_config(None, dict(config or {}))
