"""SAM: descend with the gradient taken at the worst nearby point w + e (Foret et al. 2021).

    1) g = grad L(w)                         closure, BatchNorm statistics updated here only
    2) backup <- w;  w <- w + e(g)           one fused launch (ops.sam_perturb_), e per --sam-norm
    3) g' = grad L(w + e)                    closure with BatchNorm statistics frozen
    4) w <- backup;  base step with g'       exact restore, then SGD

m-sharpness (--sam-m M): the batch is cut into chunks of M examples, each chunk takes its own
ascent step from its own gradient, and the descent uses the mean of the chunks' g'.

--amp fp16: both passes' gradients arrive times the loss scale. The ascent needs no unscaling, since
e depends on g only through g/||g|| (L2, ASAM) or sign(g) (L-inf) and the scale is a power of two; a
first gradient that overflowed skips the second pass, and the descent's update skips the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastflat import ops
from fastflat.flat import FlatParams
from fastflat.methods.base import Closure, Method
from fastflat.ops import dist
from fastflat.settings import enum_of, setting

SAMNorm = enum_of("SAMNorm", "l2", "linf")


@dataclass(frozen=True)
class SAMConfig:
    rho: float = setting(0.05, "SAM radius (>= 0): the ascent ball, in weight units (ASAM: relative to |w|).", option="rho")
    norm: str = setting("l2", "SAM ball: l2, or linf (the ascent along sign g).", choices=SAMNorm)
    adaptive: bool = setting(False, "ASAM: scale the ball by |w| (Kwon et al. 2021).")
    m: int = setting(0, "m-sharpness: examples per perturbation (0 = the whole batch shares one).")
    sync_ascent: bool = setting(False, "torchrun: ascend with the gradient averaged over the ranks (default: each "
                                "rank's own, m = per-rank batch).", option="sam_sync_ascent")

    def check(self, cfg: Any, need: Any) -> None:
        need(self.rho >= 0, "rho", "must be >= 0")
        need(self.m >= 0, "m", "must be >= 0 (0 = whole batch)")


class SAM(Method):
    name = "sam"
    summary = "Sharpness-aware minimisation: descend with the gradient at the worst point within rho (Foret et al. 2021)."
    config = SAMConfig
    panel = "SAM"
    inner_ok = True

    @classmethod
    def check_config(cls, cfg: Any, need: Any) -> None:
        need(cfg.accumulate == 1 or cfg.sam.m == 0 or cfg.batch_size % cfg.sam.m == 0, "accumulate",
             f"with --sam-m, m must divide --batch-size (each accumulated batch of {cfg.batch_size} holds whole chunks)")

    def init(self, flat: FlatParams, services=None) -> None:
        super().init(flat, services)
        self.backups = [torch.empty_like(w) for w in flat.params]  # (N,) per group: w before ascent
        self.grad_sums: list[Tensor] | None = None  # (N,) per group, allocated if m-sharpness is on

    def _ascend_and_grad(self, flat: FlatParams, closure: Closure, part: slice | None) -> tuple[Tensor, Tensor, bool]:
        """Steps 1-3 on one part of the batch; leaves g' in flat.grads and w restored, whatever
        happens in the second pass (an exception there must not leave the weights at w + e).
        Returns (loss at w, squared norm of the ascent gradient, whether that gradient overflowed:
        fp16 only; then flat.grads keep it and there is no second pass)."""
        sam = self.cfg.sam
        loss = closure(backward=True, part=part)
        if sam.sync_ascent:
            dist.all_reduce_mean_(flat.grads)  # one ascent for the global batch (a no-op in one process)
        ascent_sqnorm = ops.sam_perturb_(flat.params, flat.grads, self.backups, sam.rho, sam.norm, sam.adaptive)
        if self.scaler is not None and not bool(torch.isfinite(ascent_sqnorm).all()):
            ops.restore_(flat.params, self.backups)
            return loss, ascent_sqnorm, True
        try:
            closure(backward=True, part=part, update_bn=False)
        finally:
            ops.restore_(flat.params, self.backups)
        return loss, ascent_sqnorm, False

    def step(self, flat: FlatParams, closure: Closure, lr: float) -> dict[str, Any]:
        m, batch = self.cfg.sam.m, closure.batch_size
        if m == 0 or m >= batch:
            loss, ascent, overflow = self._ascend_and_grad(flat, closure, None)
        else:
            loss, ascent, overflow = self._m_sharpness_grad(flat, closure, m, batch)
        checks = {} if overflow else {"loss": loss, "SAM ascent gradient norm": ascent}
        return {"loss": loss, **self.base_update(flat.params, flat.grads, lr, checks)}  # overflow: skipped there

    def _m_sharpness_grad(self, flat: FlatParams, closure: Closure, m: int, batch: int) -> tuple[Tensor, Tensor, bool]:
        if self.grad_sums is None:
            self.grad_sums = [torch.empty_like(g) for g in flat.grads]
        for s in self.grad_sums:
            s.zero_()
        loss = torch.zeros((), device=flat.params[0].device)
        ascent = torch.zeros(1, device=flat.params[0].device)  # sum of the chunks' squared norms: finite iff each is
        for start in range(0, batch, m):
            part = slice(start, min(start + m, batch))
            weight = (part.stop - part.start) / batch  # chunks may be uneven: weight by size
            part_loss, part_ascent, overflow = self._ascend_and_grad(flat, closure, part)
            loss, ascent = loss + weight * part_loss, ascent + part_ascent.to(ascent.dtype)
            if overflow:
                return loss, ascent, True  # flat.grads hold the overflowed chunk's gradient: the step is skipped
            torch._foreach_add_(self.grad_sums, flat.grads, alpha=weight)
        for g, s in zip(flat.grads, self.grad_sums):
            g.copy_(s)
        return loss, ascent, False
