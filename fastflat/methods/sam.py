"""SAM and its family: descend with the gradient taken at (or built from) a worst nearby point.

    1) g = grad L(w)                         closure, BatchNorm statistics updated here only
    2) backup <- w;  w <- w + e(g)           one fused launch (ops.sam_perturb_), e per --sam-norm
    3) g' = grad L(w + e)                    closure with BatchNorm statistics frozen
    4) w <- backup;  base step with g'       exact restore, then the --optimizer step

--sam-variant changes one of those lines (each from its paper; the arithmetic on flat vectors is in
ops.sam_family, each op one fused pass with a torch twin):
    gsam     4) with g' - alpha * (g - proj_g' g), rho falling with the LR (Zhuang et al. 2022)
    fsam     2) along g - sigma * m, m an EMA of past g (Friendly SAM, Li et al. 2024)
    wsam     4) with g + gamma/(1-gamma) * (g' - g): weighted sharpness (Yue et al. 2023); by default
                decoupled: the base step with g, then w -= lr * gamma/(1-gamma) * (g' - g)
    msam     1-3) one pass: g' = grad L(w - rho * v / ||v||), v the optimizer's momentum (Becker et al. 2024)
    esam     2) only a random fraction beta of the weights moves; 3) only on the fraction gamma of the
                examples whose loss rose most (Du et al. 2022)
    looksam  every k-th step SAM, keeping g_v = g' - proj_g g'; between, one pass: g + alpha |g|/|g_v| g_v
                (Liu et al. 2022)
--sam-only norm (SAM-ON, Mueller et al. 2023) moves only normalization-layer weights in step 2, for
any variant. --sam-every / --sam-prob / --sam-from choose which steps ascend; the others are plain steps.

m-sharpness (--sam-m M, plain SAM): the batch is cut into chunks of M examples, each chunk takes its own
ascent step from its own gradient, and the descent uses the mean of the chunks' g'.

--amp fp16: both passes' gradients arrive times the loss scale. The ascent needs no unscaling, since
e depends on g only through g/||g|| (L2, ASAM) or sign(g) (L-inf) and the scale is a power of two; a
first gradient that overflowed skips the second pass, and the descent's update skips the step. State
kept across steps (F-SAM's m, LookSAM's g_v) is kept only from steps whose gradients were finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastflat import ops
from fastflat.errors import UserError
from fastflat.flat import FlatParams
from fastflat.methods.base import Closure, Method
from fastflat.methods.sam_steps import MOMENTUM_STATE, SAMSteps
from fastflat.ops import dist
from fastflat.settings import enum_of, setting

SAMNorm = enum_of("SAMNorm", "l2", "linf")
SAMVariant = enum_of("SAMVariant", "sam", "gsam", "fsam", "wsam", "msam", "esam", "looksam")
SAMOnly = enum_of("SAMOnly", "all", "norm")
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)  # SAM-ON's "norm"


@dataclass(frozen=True)
class SAMConfig:
    rho: float = setting(0.05, "SAM radius (>= 0): the ascent ball, in weight units (ASAM: relative to |w|).", option="rho")
    norm: str = setting("l2", "SAM ball: l2, or linf (the ascent along sign g).", choices=SAMNorm)
    adaptive: bool = setting(False, "ASAM: scale the ball by |w| (Kwon et al. 2021).")
    m: int = setting(0, "m-sharpness: examples per perturbation (0 = the whole batch shares one).")
    sync_ascent: bool = setting(False, "torchrun: ascend with the gradient averaged over the ranks (default: each "
                                "rank's own, m = per-rank batch).", option="sam_sync_ascent")
    variant: str = setting("sam", "Which SAM: sam, gsam, fsam, wsam, msam (one pass), esam, looksam (one pass between "
                           "its SAM steps). docs/training.md says when to use each.", choices=SAMVariant)
    only: str = setting("all", "SAM-ON: perturb only normalization-layer weights (norm), or all.", choices=SAMOnly)
    every: int = setting(1, "Ascend every K-th step only; a plain step otherwise.")
    prob: float = setting(1.0, "Randomized SAM: ascend with probability P each step (seeded), else a plain step.")
    start: float = setting(0.0, "Late-phase SAM: plain steps until this fraction of the steps (< 1), or this many "
                           "epochs (>= 1).", option="sam_from")
    gsam_alpha: float = setting(0.4, "GSAM: weight of the surrogate-gap term (alpha).", option="gsam_alpha")
    gsam_rho_min: float = setting(0.0, "GSAM: rho falls with the LR, from --rho at the peak LR to this at LR 0.",
                                  option="gsam_rho_min")
    fsam_sigma: float = setting(1.0, "F-SAM: how much of the gradients' EMA to subtract from the ascent (sigma).",
                                option="fsam_sigma")
    fsam_lambda: float = setting(0.9, "F-SAM: decay of the gradients' EMA (lambda).", option="fsam_lambda")
    wsam_gamma: float = setting(0.9, "WSAM: weight of sharpness, as gamma / (1 - gamma), in [0, 1).", option="wsam_gamma")
    wsam_decouple: bool = setting(True, "WSAM: step on the sharpness term apart from the base optimizer (the paper's).",
                                  option="wsam_decouple")
    esam_beta: float = setting(0.6, "ESAM: fraction of the weights each ascent moves (beta).", option="esam_beta")
    esam_gamma: float = setting(0.5, "ESAM: fraction of the examples the second pass uses (gamma).", option="esam_gamma")
    looksam_k: int = setting(5, "LookSAM: a full SAM step every k steps.", option="looksam_k")
    looksam_alpha: float = setting(0.7, "LookSAM: weight of the reused orthogonal gradient (alpha).",
                                   option="looksam_alpha")

    def check(self, cfg: Any, need: Any) -> None:
        need(self.rho >= 0, "rho", "must be >= 0")
        need(self.m >= 0, "m", "must be >= 0 (0 = whole batch)")
        need(self.m == 0 or self.variant == "sam", "m", f"m-sharpness is SAM's; --sam-variant {self.variant} ascends "
             "once for the whole batch: drop --sam-m")
        need(self.every >= 1, "every", "must be >= 1 (1 = every step)")
        need(0 <= self.prob <= 1, "prob", "must be in [0, 1]")
        need(self.start >= 0, "start", "must be >= 0: a fraction of the steps (< 1) or a number of epochs")
        need(0 <= self.gsam_alpha <= 1, "gsam_alpha", "must be in [0, 1]")
        need(self.gsam_rho_min >= 0, "gsam_rho_min", "must be >= 0")
        need(self.variant != "gsam" or self.rho < 0 or self.gsam_rho_min <= self.rho, "gsam_rho_min",
             "must be at most --rho (GSAM's radius falls from --rho to it)")
        need(self.fsam_sigma >= 0, "fsam_sigma", "must be >= 0")
        need(0 <= self.fsam_lambda < 1, "fsam_lambda", "must be in [0, 1)")
        need(0 <= self.wsam_gamma < 1, "wsam_gamma", "must be in [0, 1)")
        need(0 < self.esam_beta <= 1, "esam_beta", "must be in (0, 1]")
        need(0 < self.esam_gamma <= 1, "esam_gamma", "must be in (0, 1]")
        need(self.looksam_k >= 1, "looksam_k", "must be >= 1")
        need(self.looksam_alpha >= 0, "looksam_alpha", "must be >= 0")
        need(not self.sync_ascent or self.variant not in ("msam", "fsam"), "sync_ascent",
             f"--sam-variant {self.variant} already ascends the same way on every rank: drop --sam-sync-ascent")


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
        from fastflat.methods.optimizers import optimizer_class, optimizer_problem, schedule_free

        if cfg.sam.variant == "wsam" and cfg.sam.wsam_decouple and optimizer_problem(cfg.optimizer) is None:
            need(not schedule_free(optimizer_class(cfg.optimizer)), "optimizer", f"decoupled WSAM moves the weights "
                 f"after the optimizer's step, behind --optimizer {cfg.optimizer}'s averages: add --no-wsam-decouple")
        if cfg.sam.variant == "msam":

            known = optimizer_problem(cfg.optimizer) is None
            name = optimizer_class(cfg.optimizer).__name__ if known else ""
            need(not known or name in MOMENTUM_STATE, "optimizer", f"--sam-variant msam ascends along the optimizer's "
                 f"momentum, which --optimizer {cfg.optimizer} does not keep: use sgd, adam or adamw")
            need(name != "SGD" or cfg.momentum > 0, "momentum", "--sam-variant msam ascends along SGD's momentum: "
                 "give --momentum > 0")

    def init(self, flat: FlatParams, services=None) -> None:
        super().init(flat, services)
        self.backups = [torch.empty_like(w) for w in flat.params]  # (N,) per group: w before ascent
        self.grad_sums: list[Tensor] | None = None  # (N,) per group, allocated if m-sharpness is on
        self.steps_taken = 0  # steps so far, ascending or not: --sam-every / --sam-prob / --sam-from count them
        self.norm_masks = self._norm_masks(flat) if self.cfg.sam.only == "norm" else None
        self.variant = SAMSteps(self, flat)

    def _norm_masks(self, flat: FlatParams) -> list[Tensor]:
        """(N,) 0/1 per vector: 1 on the weights of normalization layers (SAM-ON's "norm")."""
        owners = {f"{name}.{p}" if name else p for name, module in flat.model.named_modules()
                  if isinstance(module, NORM_LAYERS) for p, _ in module.named_parameters(recurse=False)}
        masks = []
        for vec in flat.vectors:
            mask = torch.zeros_like(vec.param, requires_grad=False)
            for name, offset in zip(vec.names, vec.offsets):
                if name in owners:
                    mask[offset : offset + flat.model.get_parameter(name).numel()] = 1
            masks.append(mask)
        if not any(bool(m.any()) for m in masks):
            raise UserError("--sam-only norm perturbs normalization-layer weights, and this model has none "
                            "(BatchNorm, GroupNorm, LayerNorm, RMSNorm): drop --sam-only or use such a model")
        return masks

    def ascends(self, step: int) -> bool:
        """Whether 0-based `step` is a SAM step: every K-th, with probability P (seeded by the run's seed
        and the step, so a resumed run draws the same), from the late-phase start on."""
        sam = self.cfg.sam
        if step % sam.every:
            return False
        if sam.start > 0:
            services = self.services
            first = sam.start * (services.total_steps if sam.start < 1 else services.steps_per_epoch)
            if step < first:
                return False
        if sam.prob < 1:
            draw = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + 17)
            return bool(torch.rand(1, generator=draw).item() < sam.prob)
        return True

    def ascent_rho(self, lr: float) -> float:
        """The radius this step: --rho, or for GSAM the LR's share of its peak between --gsam-rho-min and --rho."""
        sam = self.cfg.sam
        if sam.variant != "gsam" or self.cfg.lr <= 0:
            return sam.rho
        share = min(max(lr / self.cfg.lr, 0.0), 1.0)
        return sam.gsam_rho_min + (sam.rho - sam.gsam_rho_min) * share

    def ascend_and_grad(self, flat: FlatParams, closure: Closure, part: slice | None, rho: float,
                        masks: list[Tensor] | None = None, prepare=None, second=None) -> tuple[Tensor, Tensor, bool]:
        """Steps 1-3 on one part of the batch; leaves g' in flat.grads and w restored, whatever
        happens in the second pass (an exception there must not leave the weights at w + e).
        `prepare(loss)` may change flat.grads (the ascent direction) after the first pass; `second()`
        replaces the plain second pass. Returns (loss at w, squared norm of the ascent direction,
        whether that overflowed: fp16 only; then flat.grads keep it and there is no second pass)."""
        sam = self.cfg.sam
        loss = closure(backward=True, part=part, keep_losses=sam.variant == "esam")
        if sam.sync_ascent:
            dist.all_reduce_mean_(flat.grads)  # one ascent for the global batch (a no-op in one process)
        if prepare is not None and not prepare(loss):
            return loss, torch.full((1,), float("inf"), device=loss.device), True
        masks = masks if masks is not None else self.norm_masks
        ascent_sqnorm = ops.sam_perturb_(flat.params, flat.grads, self.backups, rho, sam.norm, sam.adaptive, masks)
        if self.scaler is not None and not bool(torch.isfinite(ascent_sqnorm).all()):
            ops.restore_(flat.params, self.backups)
            return loss, ascent_sqnorm, True
        try:
            if second is not None:
                second()
            else:
                closure(backward=True, part=part, update_bn=False)
        finally:
            ops.restore_(flat.params, self.backups)
        return loss, ascent_sqnorm, False

    def step(self, flat: FlatParams, closure: Closure, lr: float) -> dict[str, Any]:
        step, self.steps_taken = self.steps_taken, self.steps_taken + 1
        if not self.ascends(step):
            loss = closure(backward=True)
            return {"loss": loss, **self.base_update(flat.params, flat.grads, lr, {"loss": loss})}
        if self.cfg.sam.variant != "sam":
            return self.variant.step(closure, lr)
        m, batch = self.cfg.sam.m, closure.batch_size
        if m == 0 or m >= batch:
            loss, ascent, overflow = self.ascend_and_grad(flat, closure, None, self.cfg.sam.rho)
        else:
            loss, ascent, overflow = self._m_sharpness_grad(flat, closure, m, batch)
        checks = {} if overflow else {"loss": loss, "SAM ascent gradient norm": ascent}
        return {"loss": loss, **self.base_update(flat.params, flat.grads, lr, checks)}  # overflow: skipped

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
            part_loss, part_ascent, overflow = self.ascend_and_grad(flat, closure, part, self.cfg.sam.rho)
            loss, ascent = loss + weight * part_loss, ascent + part_ascent.to(ascent.dtype)
            if overflow:
                return loss, ascent, True  # flat.grads hold the overflowed chunk's gradient: the step is skipped
            torch._foreach_add_(self.grad_sums, flat.grads, alpha=weight)
        for g, s in zip(flat.grads, self.grad_sums):
            g.copy_(s)
        return loss, ascent, False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sam_steps_taken": self.steps_taken, **self.variant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps_taken = int(state.get("sam_steps_taken", 0))
        self.variant.load_state_dict(state)
