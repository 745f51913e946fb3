"""An exponential moving average of the weights over any method: `--ema DECAY` (or `--method ema --inner M`).

    EMA(cfg, SAM(cfg))     # the inner method takes the steps; after each one the average moves toward them

After optimizer step k the average is w_1 at k = 1 and then lerp(avg, w_k, 1 - d_k), d_k = min(decay,
warmup(k)), as torch's AveragedModel with get_ema_multi_avg_fn (no warmup) and timm's ModelEmaV3 with
update(model, step=k) do; one fused launch per flat vector (fastflat.ops.average_). Warm-ups:

    timm  d_k = 1 - (1 + (k - 1)) ** (-2/3)      ModelEmaV3(use_warmup=True), warmup_gamma 1, power 2/3
    tf    d_k = (1 + (k - 1)) / (10 + (k - 1))   tf.train.ExponentialMovingAverage(num_updates=k - 1)

BatchNorm (`--ema-bn`): `ema` averages the running statistics with the weights (timm's default, and
AveragedModel's use_buffers=True); `recompute` re-estimates them for the averaged weights before each
evaluation (as SWA does). The average is scored at every evaluation (ema_test_acc in metrics.jsonl), saved
as members/ema.pt at the end, and is the model the run delivers (summary test_acc; the last iterate is
iterate_acc). Its vectors and step count are in every checkpoint, so a resumed run averages bit for bit.
"""

from __future__ import annotations

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


def decay_at(step: int, decay: float, warmup: str) -> float:
    """d_k for optimizer step k >= 2 (step 1 copies the weights)."""
    t = step - 1
    if warmup == "timm":
        return max(min(1.0 - (1.0 + t) ** (-2.0 / 3.0), decay), 0.0)
    if warmup == "tf":
        return min(decay, (1.0 + t) / (10.0 + t))
    return decay


class EMA(Wrapper):
    name = "ema"
    summary = "An exponential moving average of the weights over --inner (or --ema DECAY over any method)."
    config = EMAConfig
    panel = "Averaging: EMA"
    owns_lr = False  # the inner method's schedule applies
    inner_ok = False
    averages = True
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

    def weights(self, flat: FlatParams) -> list[torch.Tensor]:
        return self.average if self.updates > 0 else flat.params

    def epoch_scores(self, flat: FlatParams) -> dict[str, float]:
        """The average's test loss and accuracy now (ema_test_*), beside the iterate's."""
        scores = self.inner.epoch_scores(flat)
        if self.updates == 0:
            return scores
        with self._as_average(flat):
            scores.update({f"ema_test_{k}": v for k, v in self.services.evaluate().items()})
        return scores

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        inner = super().finish(flat)
        with self._as_average(flat):
            result = {f"ema_{k}": v for k, v in self.services.evaluate().items()}
            result["ema_checkpoint"] = self.services.save_member("ema")
        return {**inner, **result, "ema_updates": self.updates, "delivers": "ema"}

    def _as_average(self, flat: FlatParams):
        """Inside: the model holds the average (and its BatchNorm statistics); after: the iterate again."""
        import contextlib

        @contextlib.contextmanager
        def swapped():
            model = flat.model
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            flat.copy_params_(self.average)
            if self.cfg.ema.bn == "recompute":
                self.services.update_bn()
            else:
                for name, b in _statistics(model).items():
                    b.copy_(self.bn_average[name])
            try:
                yield
            finally:
                model.load_state_dict(saved)

        return swapped()

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


def _statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point buffers (BatchNorm running means and variances) by name."""
    return {name: b for name, b in model.named_buffers() if b.is_floating_point()}
