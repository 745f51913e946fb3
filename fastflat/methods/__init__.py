"""Training methods by the name the CLI and configs use: the built-in classes, then any a package adds
through the `fastflat.methods` entry-point group (docs/plugins.md). Everything else about a method
(its settings, what it supports) is read from its class.

    cls = method_class("sam"); cls.config, cls.fp16, cls.owns_lr      # facts, never name comparisons
    method = build_method(cfg)                                          # --inner and --swa composed
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from typing import TYPE_CHECKING

from fastflat.errors import UserError
from fastflat.methods.base import Closure, Method, RunServices
from fastflat.methods.curve import Curve
from fastflat.methods.averaging import EMA, LAWA
from fastflat.methods.fullbatch import FullBatch
from fastflat.methods.sam import SAM
from fastflat.methods.sgd import SGD
from fastflat.methods.spartan import EvolutionStrategies, Spartan
from fastflat.methods.wrappers import FGE, SWA, SnapshotEnsemble

if TYPE_CHECKING:  # annotations only: the config is assembled above the methods
    from fastflat.config import TrainConfig

BUILTIN: tuple[type[Method], ...] = (SGD, SAM, EvolutionStrategies, FullBatch, SWA, SnapshotEnsemble, FGE, Spartan, Curve,
                                     EMA, LAWA)
ENTRY_POINT_GROUP = "fastflat.methods"


@functools.cache
def registry() -> dict[str, type[Method]]:
    """Every method by name: the built-ins, then the plugins (an entry point NAME = "module:Class"). A plugin
    that does not load, or is no Method named NAME, is left out with one line on stderr saying why: a
    broken package must not stop fastflat (its --method NAME is then refused as unknown)."""
    methods = {cls.name: cls for cls in BUILTIN}
    for entry in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        problem = None
        try:
            cls = entry.load()
        except Exception as e:  # whatever the plugin's import raises
            problem = f"does not load ({type(e).__name__}: {e})"
        else:
            if not (isinstance(cls, type) and issubclass(cls, Method)):
                problem = "is not a fastflat.methods.Method subclass"
            elif cls.name != entry.name:
                problem = f"says name = {cls.name!r}: make its class's name the entry point's"
            elif entry.name in methods:
                problem = "takes the name of another method: rename it"
        if problem:
            sys.stderr.write(f"fastflat: method plugin {entry.name!r} ({entry.value}) {problem}; left out\n")
            continue
        methods[entry.name] = cls
    return methods


def method_class(name: str) -> type[Method]:
    try:
        return registry()[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(registry())}") from None


def inner_names() -> list[str]:
    """Methods a wrapper (swa, sse, fge, spartan) may wrap with --inner."""
    return [name for name, cls in registry().items() if cls.inner_ok]


def sections() -> dict[str, type]:
    """Config section name -> its settings dataclass, one per method that has settings (shared ones once)."""
    found: dict[str, type] = {}
    for cls in registry().values():
        if cls.config is not None:
            section = cls.settings_key()
            if found.setdefault(section, cls.config) is not cls.config:
                raise UserError(f"method {cls.name!r} declares settings section {section!r}, which another method "
                                f"already declares with other settings")
    return found


def sections_in_use(cfg: TrainConfig) -> list[str]:
    """The settings sections this run reads: its method's, the wrapped method's, and SWA's when --swa."""
    cls = method_class(cfg.method)
    used = [cls.settings_key()] + ([method_class(cfg.inner).settings_key()] if cls.wraps else [])
    if cfg.swa.enabled:
        used.append(SWA.settings_key())
    if cfg.ema.decay > 0:
        used.append(EMA.settings_key())
    if cfg.lawa.k > 0:
        used.append(LAWA.settings_key())
    return [section for section in dict.fromkeys(used) if section in sections()]


def build_method(cfg: TrainConfig) -> Method:
    """`--method swa|sse|fge|spartan|ema|lawa` wraps `--inner`; `--swa` adds SWA on top of any method whose
    class has no swa_refusal, `--ema` / `--lawa` an average on top of any without average_refusal (the
    config refuses the others, and two averages together, before anything is built)."""
    cls = method_class(cfg.method)
    method = cls(cfg, method_class(cfg.inner)(cfg)) if cls.wraps else cls(cfg)
    if cfg.swa.enabled and not isinstance(method, SWA):
        method = SWA(cfg, method)
    if cfg.lawa.k > 0 and not isinstance(method, LAWA):
        method = LAWA(cfg, method)
    return EMA(cfg, method) if cfg.ema.decay > 0 and not isinstance(method, EMA) else method


__all__ = ["BUILTIN", "Closure", "Method", "RunServices", "build_method", "inner_names", "method_class", "registry",
           "sections", "sections_in_use"]
