"""The base optimizer every method steps with (`--optimizer`), over flat vectors: any torch.optim class.

    cls = optimizer_class("adamw")                 # sgd | adamw | adam | a torch.optim name | module:Class
                                                    # | schedulefree-sgd | schedulefree-adamw
    opt = build_optimizer(cfg, flat.params)         # lr, momentum, nesterov, betas, weight decay as accepted

Weight decay is the optimizer's own (coupled into the gradient for SGD and Adam, decoupled for AdamW),
unless --no-decay-norm-bias asks for timm's habit of not decaying normalization and bias parameters:
then the optimizer gets weight_decay=0 and `decay_` applies the same rule through a 0/1 mask over the
flat buffer (no parameter groups needed, one launch per vector).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from fastflat.errors import UserError

ALIASES = {"sgd": "SGD", "adamw": "AdamW", "adam": "Adam"}
SCHEDULE_FREE = {"schedulefree-sgd": "schedulefree:SGDScheduleFree", "schedulefree-adamw": "schedulefree:AdamWScheduleFree"}
UNSUITABLE = {"LBFGS": "it evaluates the loss itself inside step(closure)", "SparseAdam": "it takes sparse gradients only",
              "Optimizer": "it is the base class"}


def _resolve(name: str) -> tuple[type | None, str]:
    """(the class, "") or (None, what is wrong)."""
    if name.lower() in SCHEDULE_FREE:
        try:
            importlib.import_module("schedulefree")
        except ImportError:
            return None, f"{name} needs the schedulefree package: pip install schedulefree (or fastflat's [schedulefree] extra)"
        name = SCHEDULE_FREE[name.lower()]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            return None, f"{name} does not import ({type(e).__name__}: {e})"
    else:
        by_lower = {n.lower(): n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)}
        found = ALIASES.get(name.lower()) or by_lower.get(name.lower())
        if found is None:
            known = sorted(n for n in by_lower.values() if n[0].isupper() and n not in UNSUITABLE)
            return None, f"use sgd, adamw, adam, a torch.optim class ({', '.join(known)}) or module:Class"
        cls = getattr(torch.optim, found)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return None, f"{name} is not a torch.optim.Optimizer subclass"
    if cls.__name__ in UNSUITABLE:
        return None, f"{cls.__name__} cannot be a base optimizer here: {UNSUITABLE[cls.__name__]}"
    return cls, ""


def optimizer_problem(name: str) -> str | None:
    """What is wrong with --optimizer `name`, or None."""
    return _resolve(name)[1] or None


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """sgd | adamw | adam, any torch.optim class by name (any case: rmsprop, NAdam), or module:Class."""
    cls, problem = _resolve(name)
    if cls is None:
        raise UserError(f"optimizer {name!r}: {problem}")
    return cls


def schedule_free(optimizer: Any) -> bool:
    """An optimizer (or its class) that trains at one point (y) and delivers another (x), switched by its
    train() and eval() (Defazio et al. 2024, the schedulefree package); torch.optim has none."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


@contextlib.contextmanager
def schedule_free_evaluation(optimizer: Any, params: list[Tensor], model: torch.nn.Module,
                             update_bn: Callable[[], None]) -> Iterator[tuple[list[Tensor], dict[str, Tensor]]]:
    """Inside: the model holds x, the point schedule-free delivers, with BatchNorm statistics recomputed
    for it (its authors' advice: the statistics gathered while training belong to y); yields y, the
    training weights, and the buffers as training left them. After: y and the statistics are copied back bit for bit (not recomputed by the
    optimizer's train(), which rounds), so a run that evaluates steps exactly as one that does not."""
    train_weights = [p.detach().clone() for p in params]  # y, (N,) per flat group
    statistics = {name: b.clone() for name, b in model.named_buffers()}
    optimizer.eval()  # params <- x
    update_bn()
    try:
        yield train_weights, statistics
    finally:
        with torch.no_grad():
            for p, y in zip(params, train_weights):
                p.copy_(y)
            for name, b in model.named_buffers():
                b.copy_(statistics[name])
        for group in optimizer.param_groups:
            group["train_mode"] = True


def decoupled(cls: type[torch.optim.Optimizer]) -> bool:
    """True where the optimizer's weight decay shrinks the weights (AdamW) instead of adding to the gradient."""
    return issubclass(cls, torch.optim.AdamW)


def build_optimizer(cfg: Any, params: list[Tensor]) -> torch.optim.Optimizer:
    """The configured optimizer over `params`, given each setting its constructor accepts."""
    cls = optimizer_class(cfg.optimizer)
    settings = {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov, "betas": tuple(cfg.betas),
                "weight_decay": cfg.weight_decay if cfg.decay_norm_bias else 0.0}
    accepted = inspect.signature(cls).parameters
    return cls(params, **{k: v for k, v in settings.items() if k in accepted})


@torch.no_grad()
def decay_(cls: type[torch.optim.Optimizer], params: list[Tensor], grads: list[Tensor], masks: list[Tensor],
           lr: float, weight_decay: float) -> None:
    """--no-decay-norm-bias: the optimizer's own weight decay rule on the masked weights only (mask (N,),
    1 for weights of 2+ dims); call right before the optimizer step, where the optimizer would apply it."""
    if decoupled(cls):  # AdamW: w <- w (1 - lr wd) before the Adam update
        for p, m in zip(params, masks):
            p.mul_(1 - lr * weight_decay * m)
    else:  # SGD, Adam, ...: g <- g + wd w
        for g, p, m in zip(grads, params, masks):
            g.add_(p * m, alpha=weight_decay)
