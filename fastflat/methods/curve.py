"""Mode-connecting curves (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling").

A curve phi(t), t in [0, 1], joins two trained solutions w1 = phi(0) and w2 = phi(1) through a trained
bend theta:
    Bezier:     phi(t) = (1-t)^2 w1 + 2t(1-t) theta + t^2 w2
    polychain:  phi(t) = 2(t theta + (0.5 - t) w1)           for t <= 0.5
                phi(t) = 2((t - 0.5) w2 + (1 - t) theta)     for t >  0.5
Both are a(t) w1 + b(t) theta + c(t) w2, so the curve lives as three flat vectors and any nn.Module
works unchanged: each step draws t ~ U(0, 1), writes phi(t) into the model's flat buffer (one fused
op), runs forward/backward through the model, and the bend's gradient is b(t) * dL/dphi by the chain
rule. Every parameter lies on the curve, BatchNorm's affine ones too; BatchNorm statistics are
re-estimated wherever the curve is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastflat import ops
from fastflat.errors import UserError
from fastflat.flat import FlatParams
from fastflat.methods.base import Closure, Method, RunServices
from fastflat.settings import enum_of, setting

CurveKind = enum_of("CurveKind", "bezier", "polychain")


@dataclass(frozen=True)
class CurveConfig:
    """A mode-connecting curve (Garipov et al. 2018) between two trained solutions: --method curve trains
    the bend theta; the end points stay fixed. `fastflat curve` fills these in."""

    start: str | None = setting(None, "Curve end point w1: a run directory or member file.", option="curve_start")
    end: str | None = setting(None, "Curve end point w2 (same model and dataset).", option="curve_end")
    kind: str = setting("bezier", "Curve through the trained bend: bezier (quadratic) or polychain.", option="curve_kind",
                        choices=CurveKind)

ENDS = ("start", "end", "bend")  # member files a finished curve run holds: w1, w2, theta


def coefficients(kind: str, t: float) -> tuple[float, float, float]:
    """(a, b, c) with phi(t) = a w1 + b theta + c w2; exactly (1, 0, 0) at t = 0 and (0, 0, 1) at t = 1."""
    if kind == "bezier":
        return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t
    if kind == "polychain":
        return (1.0 - 2.0 * t, 2.0 * t, 0.0) if t <= 0.5 else (0.0, 2.0 * (1.0 - t), 2.0 * t - 1.0)
    raise ValueError(f"unknown curve kind {kind!r}")


def curve_point_(out: list[Tensor], w1: list[Tensor], theta: list[Tensor], w2: list[Tensor], kind: str, t: float) -> None:
    """Write phi(t) into `out` (one (N,) vector per flat group)."""
    ops.combine3_(out, w1, theta, w2, *coefficients(kind, t))


class Curve(Method):
    """Trains the bend of a curve between two fixed end points with SGD (momentum, weight decay on the
    bend, the shared LR schedule); the trainer's loop, checkpoints and resume are unchanged."""

    name = "curve"
    summary = "Train the bend of a mode-connecting curve between two solutions (Garipov et al. 2018)."
    config = CurveConfig
    panel = "Mode-connecting curve (--method curve; or fastflat curve)"
    fp16 = False
    swa_refusal = "a curve trains a bend between two fixed ends, not one model to average (fastflat curve scores every t)"
    average_refusal = swa_refusal
    schedule_free_refusal = "a curve's bend is scored at every t by fastflat curve, not at a schedule-free average"

    @classmethod
    def check_config(cls, cfg: Any, need: Any) -> None:
        for end in ("start", "end"):
            need(bool(getattr(cfg.curve, end)), f"curve.{end}",
                 "--method curve needs both end points: --curve-start RUN --curve-end RUN")

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        self.services = services
        self.kind = self.cfg.curve.kind
        if getattr(services, "resuming", False):  # the checkpoint holds both ends: their runs may be gone
            self.start, self.end = flat.clone_params(), flat.clone_params()  # filled by load_state_dict
        else:
            self.start = self._end_point(services, self.cfg.curve.start, "--curve-start")
            self.end = self._end_point(services, self.cfg.curve.end, "--curve-end")
            if all(torch.equal(a, b) for a, b in zip(self.start, self.end)):
                raise UserError("the curve's end points are the same weights: pass two different runs")
        self.bend = [((a + b) * 0.5).requires_grad_(False) for a, b in zip(self.start, self.end)]  # the midpoint
        self.bend_grads = [torch.zeros_like(b) for b in self.bend]
        self.optimizer = self.make_optimizer(self.bend, flat)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)  # t per step; checkpointed
        self.t = 0.5

    def _end_point(self, services: RunServices, path: str, option: str) -> list[Tensor]:
        config, vectors = services.point_weights(path)
        for key in ("model", "dataset"):
            if config[key] != getattr(self.cfg, key):
                raise UserError(f"{option} {path} is a {key} {config[key]!r} run, this curve is for "
                                f"{getattr(self.cfg, key)!r}: both ends need one architecture and dataset")
        return vectors

    def step(self, flat: FlatParams, closure: Closure, lr: float) -> dict[str, Any]:
        self.t = float(torch.rand((), generator=self.generator))
        curve_point_(flat.params, self.start, self.bend, self.end, self.kind, self.t)
        loss = closure(backward=True)  # dL/dphi in flat.grads
        b = coefficients(self.kind, self.t)[1]
        for g_bend, g in zip(self.bend_grads, flat.grads):
            torch.mul(g, b, out=g_bend)  # chain rule: dphi/dtheta = b(t) I
        return {"loss": loss, "t": self.t, **self.base_update(self.bend, self.bend_grads, lr, {"loss": loss})}

    def point(self, flat: FlatParams, t: float) -> None:
        """Put phi(t) into the model (BatchNorm statistics are left to the caller)."""
        curve_point_(flat.params, self.start, self.bend, self.end, self.kind, t)

    def end_epoch(self, flat: FlatParams, epoch: int) -> None:
        """The epoch's test score is the curve's midpoint, BatchNorm re-estimated there."""
        self.point(flat, 0.5)
        self.services.update_bn()

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        """Save w1, w2 and theta as plain state_dicts, so the curve run alone can be evaluated."""
        saved = {}
        for tag, vectors in zip(ENDS, (self.start, self.end, self.bend)):
            flat.copy_params_(vectors)
            saved[f"curve_{tag}"] = self.services.save_member(tag)
        self.point(flat, 0.5)
        self.services.update_bn()
        return {"curve_kind": self.kind, **saved}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "bend": self.bend, "start": self.start, "end": self.end,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for mine, saved in ((self.bend, state["bend"]), (self.start, state["start"]), (self.end, state["end"])):
            for v, s in zip(mine, saved):
                v.copy_(s)
        self.generator.set_state(state["generator"])
