"""Training methods, by the name the CLI and configs use, and `build_method` that composes them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastflat.methods.base import Closure, Method, RunServices
from fastflat.methods.curve import Curve
from fastflat.methods.fullbatch import FullBatch
from fastflat.methods.sam import SAM
from fastflat.methods.sgd import SGD
from fastflat.methods.spartan import EvolutionStrategies, Spartan
from fastflat.methods.wrappers import FGE, SWA, SnapshotEnsemble

if TYPE_CHECKING:  # annotations only: the config is assembled above the methods
    from fastflat.config import TrainConfig

METHODS: dict[str, type[Method]] = {"sgd": SGD, "sam": SAM, "es": EvolutionStrategies,  # take steps themselves
                                    "fullbatch": FullBatch, "curve": Curve}
WRAPPERS = {"swa": SWA, "sse": SnapshotEnsemble, "fge": FGE, "spartan": Spartan}  # wrap one of METHODS


def build_method(cfg: TrainConfig) -> Method:
    """`--method swa|sse|fge` wraps `--inner`; `--swa` adds SWA on top of a stepping method."""
    if cfg.method in WRAPPERS:
        return WRAPPERS[cfg.method](cfg, METHODS[cfg.inner](cfg))
    method = METHODS[cfg.method](cfg)
    return SWA(cfg, method) if cfg.swa.enabled else method


__all__ = ["METHODS", "WRAPPERS", "Closure", "Method", "RunServices", "build_method"]
