"""Averages of the weights over any method, each the model its run delivers: `--ema DECAY` and `--lawa K`.

    EMA(cfg, SAM(cfg))     # the inner method takes the steps; after each one the average moves toward them
    LAWA(cfg, SGD(cfg))    # every N steps the weights join a ring of the last K; the run delivers their mean

EMA: after optimizer step k the average is w_1 at k = 1 and then lerp(avg, w_k, 1 - d_k), d_k = min(decay,
warmup(k)), as torch's AveragedModel with get_ema_multi_avg_fn (no warmup) and timm's ModelEmaV3 with
update(model, step=k) do; one fused launch per flat vector (fastflat.ops.average_). Warm-ups:

    timm  d_k = 1 - (1 + (k - 1)) ** (-2/3)      ModelEmaV3(use_warmup=True), warmup_gamma 1, power 2/3
    tf    d_k = (1 + (k - 1)) / (10 + (k - 1))   tf.train.ExponentialMovingAverage(num_updates=k - 1)

BatchNorm under EMA (`--ema-bn`): `ema` averages the running statistics with the weights (timm's default,
and AveragedModel's use_buffers=True); `recompute` re-estimates them for the average before each
evaluation, as SWA does.

LAWA (latest weight averaging, Kaddour 2022): every `--lawa-every` steps (default: each epoch's end) the
weights join a ring of the last K; the average is kept as an fp64 running sum, so a new checkpoint costs
O(N) (add it, subtract the one it replaces), not O(K N). BatchNorm is recomputed for the average.

Each average is scored at every evaluation (<tag>_test_acc in metrics.jsonl), saved as members/<tag>.pt
at the end, and is the model the run delivers (summary test_acc; the last iterate is iterate_acc). Its
state is in every checkpoint, so a resumed run averages bit for bit. One average at a time: --ema,
--lawa and SWA each deliver theirs, so the config refuses two of them together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastflat import ops
from fastflat.flat import FlatParams
from fastflat.methods.base import RunServices
from fastflat.methods.wrappers import Wrapper
from fastflat.settings import enum_of, setting

if TYPE_CHECKING:  # annotations only: the config is assembled above the methods
    from fastflat.config import TrainConfig

EMAWarmup = enum_of("EMAWarmup", "off", "timm", "tf")
EMABatchNorm = enum_of("EMABatchNorm", "ema", "recompute")


@dataclass(frozen=True)
class EMAConfig:
    decay: float = setting(0.0, "Keep an exponential moving average of the weights with this decay, over any method "
                                "(e.g. 0.999; 0 = off); it is evaluated every epoch and is the model the run delivers.",
                           option="ema")
    warmup: str = setting("off", "EMA decay warm-up: off, timm (1 - (1 + t)^(-2/3), ModelEmaV3) or tf "
                                 "((1 + t) / (10 + t)); the decay is the smaller of it and --ema.", choices=EMAWarmup)
    bn: str = setting("ema", "EMA BatchNorm statistics: ema (averaged with the weights) or recompute (re-estimated "
                             "for the average before each evaluation).", choices=EMABatchNorm)

    def check(self, cfg: Any, need: Any) -> None:
        need(0 <= self.decay < 1, "decay", "must be in [0, 1) (0 = off)")


@dataclass(frozen=True)
class LAWAConfig:
    k: int = setting(0, "Latest weight averaging: deliver the mean of the last K checkpoints (0 = off), over any method.",
                     option="lawa")
    every: int = setting(0, "LAWA: take a checkpoint every N steps (0 = at each epoch's end).")

    def check(self, cfg: Any, need: Any) -> None:
        need(self.k >= 0, "k", "must be >= 0 (0 = off)")
        need(self.every >= 0, "every", "must be >= 0 (0 = each epoch)")


def decay_at(step: int, decay: float, warmup: str) -> float:
    """d_k for optimizer step k >= 2 (step 1 copies the weights)."""
    t = step - 1
    if warmup == "timm":
        return max(min(1.0 - (1.0 + t) ** (-2.0 / 3.0), decay), 0.0)
    if warmup == "tf":
        return min(decay, (1.0 + t) / (10.0 + t))
    return decay


class Averaging(Wrapper):
    """What EMA and LAWA share: the average swapped into the model to be scored every evaluation and at
    the end (its BatchNorm statistics averaged or recomputed), saved as a member, delivered."""

    tag = "average"  # summary keys <tag>_acc, <tag>_loss; members/<tag>.pt; <tag>_test_* per epoch
    panel = "Averaging: EMA and LAWA"
    owns_lr = False  # the inner method's schedule applies
    inner_ok = False
    averages = True

    def recomputes_bn(self) -> bool:
        return True

    def average_weights(self) -> list[torch.Tensor] | None:
        """The average as one vector per flat group, or None before there is one."""
        raise NotImplementedError

    def average_statistics(self) -> dict[str, torch.Tensor]:
        """BatchNorm statistics that go with the average when they are not recomputed."""
        return {}

    def weights(self, flat: FlatParams) -> list[torch.Tensor]:
        average = self.average_weights()
        return flat.params if average is None else average

    def epoch_scores(self, flat: FlatParams) -> dict[str, float]:
        """The average's test loss and accuracy now (<tag>_test_*), beside the iterate's."""
        scores = self.inner.epoch_scores(flat)
        if self.average_weights() is None:
            return scores
        with self._as_average(flat):
            scores.update({f"{self.tag}_test_{k}": v for k, v in self.services.evaluate().items()})
        return scores

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        inner = super().finish(flat)
        with self._as_average(flat):
            result = {f"{self.tag}_{k}": v for k, v in self.services.evaluate().items()}
            result[f"{self.tag}_checkpoint"] = self.services.save_member(self.tag)
        return {**inner, **result, "delivers": self.tag}

    @contextlib.contextmanager
    def _as_average(self, flat: FlatParams) -> Iterator[None]:
        """Inside: the model holds the average (and its BatchNorm statistics); after: the iterate again."""
        model = flat.model
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        flat.copy_params_(self.weights(flat))
        if self.recomputes_bn():
            self.services.update_bn()
        else:
            for name, b in _statistics(model).items():
                b.copy_(self.average_statistics()[name])
        try:
            yield
        finally:
            model.load_state_dict(saved)


class EMA(Averaging):
    name = "ema"
    summary = "An exponential moving average of the weights over --inner (or --ema DECAY over any method)."
    config = EMAConfig
    tag = "ema"
    swa_refusal = "an EMA delivers its own average as the run's model: use --ema or --swa, not both"

    @classmethod
    def check_config(cls, cfg: TrainConfig, need: Any) -> None:
        need(cfg.ema.decay > 0, "ema.decay", "--method ema averages with --ema DECAY, e.g. --ema 0.999")

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        super().init(flat, services)
        self.average = [torch.zeros_like(w) for w in flat.params]  # (N,) per flat group
        self.count = torch.zeros((), dtype=torch.long, device=flat.params[0].device)  # updates so far, for the kernel
        self.updates = 0  # the same count on the host: the decay of the next update needs no sync
        self.bn_average = {name: torch.zeros_like(b) for name, b in _statistics(flat.model).items()}

    def after_step(self, flat: FlatParams, steps_done: int) -> None:
        super().after_step(flat, steps_done)
        self.updates += 1
        decay = decay_at(self.updates, self.cfg.ema.decay, self.cfg.ema.warmup)
        ops.average_(self.average, flat.params, self.count, decay)  # the first update copies (count 0)
        if self.cfg.ema.bn == "ema":
            for name, b in _statistics(flat.model).items():
                average = self.bn_average[name]
                average.copy_(b) if self.updates == 1 else average.lerp_(b.to(average.dtype), 1.0 - decay)
        self.count += 1

    def recomputes_bn(self) -> bool:
        return self.cfg.ema.bn == "recompute"

    def average_weights(self) -> list[torch.Tensor] | None:
        return self.average if self.updates > 0 else None

    def average_statistics(self) -> dict[str, torch.Tensor]:
        return self.bn_average

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        return {**super().finish(flat), "ema_updates": self.updates}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "average": self.average, "count": self.count, "updates": self.updates,
                "bn_average": self.bn_average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for a, saved in zip(self.average, state["average"]):
            a.copy_(saved)
        self.count.copy_(state["count"])
        self.updates = int(state["updates"])
        for name, saved in state["bn_average"].items():
            self.bn_average[name].copy_(saved)


class LAWA(Averaging):
    name = "lawa"
    summary = "Latest weight averaging over --inner (or --lawa K over any method): the mean of the last K checkpoints."
    config = LAWAConfig
    tag = "lawa"
    swa_refusal = "LAWA delivers its own average as the run's model: use --lawa or --swa, not both"

    @classmethod
    def check_config(cls, cfg: TrainConfig, need: Any) -> None:
        need(cfg.lawa.k > 0, "lawa.k", "--method lawa averages the last K checkpoints: give --lawa K, e.g. --lawa 5")

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        super().init(flat, services)
        k = self.cfg.lawa.k
        self.every = self.cfg.lawa.every or services.steps_per_epoch
        self.ring = [torch.zeros(k, w.numel(), dtype=w.dtype, device=w.device) for w in flat.params]  # (K, N)
        self.total = [torch.zeros(w.numel(), dtype=torch.float64, device=w.device) for w in flat.params]  # (N,)
        self.stored = 0  # checkpoints taken so far; the ring holds the last min(stored, K)
        self.average: list[torch.Tensor] = [torch.zeros_like(w) for w in flat.params]

    def after_step(self, flat: FlatParams, steps_done: int) -> None:
        super().after_step(flat, steps_done)
        if steps_done % self.every:
            return
        k, slot = self.cfg.lawa.k, self.stored % self.cfg.lawa.k
        for ring, total, w, average in zip(self.ring, self.total, flat.params, self.average):
            if self.stored >= k:
                total -= ring[slot]  # the oldest checkpoint leaves the window
            ring[slot].copy_(w)
            total += w
            average.copy_(total / min(self.stored + 1, k))
        self.stored += 1

    def average_weights(self) -> list[torch.Tensor] | None:
        return self.average if self.stored > 0 else None

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        return {**super().finish(flat), "lawa_checkpoints": min(self.stored, self.cfg.lawa.k)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ring": self.ring, "total": self.total, "stored": self.stored,
                "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for mine, saved in zip(self.ring + self.total + self.average, state["ring"] + state["total"] + state["average"]):
            mine.copy_(saved)
        self.stored = int(state["stored"])


def _statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point buffers (BatchNorm running means and variances) by name."""
    return {name: b for name, b in model.named_buffers() if b.is_floating_point()}
