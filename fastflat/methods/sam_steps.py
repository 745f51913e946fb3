"""The steps of the SAM variants (--sam-variant other than sam), on the SAM method's flat vectors.

Each variant is one method here, named as on the command line; the formulas are in methods/sam.py's
docstring and in each method's. Buffers are allocated on first use, so a variant pays only for what it
keeps: GSAM, WSAM and LookSAM keep the first gradient g through the second pass (one (N,) vector per
group); F-SAM its EMA m; LookSAM its orthogonal part g_v (and a candidate while a step may still
overflow); WSAM, decoupled, the sharpness gradient g' - g. Norms and dot products stay on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fastflat import ops
from fastflat.flat import FlatParams
from fastflat.methods.base import Closure
from fastflat.ops import dist
from fastflat.ops.sam_family import axpby_, fsam_direction_, total_dot

if TYPE_CHECKING:
    from fastflat.methods.sam import SAM

EPS = 1e-12  # keeps ratios of norms finite when a gradient is zero
MOMENTUM_STATE = {"SGD": "momentum_buffer", "Adam": "exp_avg", "AdamW": "exp_avg"}  # msam ascends along it


def inverse_loss_scale(scaler: torch.amp.GradScaler | None) -> Tensor | float:
    """1 / the current loss scale, on the device (no sync), the way GradScaler.unscale_ computes it."""
    if scaler is None:
        return 1.0
    return scaler._scale.double().reciprocal().float()  # GradScaler keeps its scale as this device tensor


class SAMSteps:
    def __init__(self, method: SAM, flat: FlatParams):
        self.method, self.flat, self.sam = method, flat, method.cfg.sam
        self.first_grads: list[Tensor] | None = None  # g at w, (N,) per group, kept through the second pass
        self.momentum: list[Tensor] | None = None  # fsam: EMA m of the first gradients
        self.orthogonal: list[Tensor] | None = None  # looksam: g_v of its last full step
        self.candidate: list[Tensor] | None = None  # looksam: the new g_v until its step is known finite
        self.sharpness: list[Tensor] | None = None  # wsam, decoupled: g' - g
        self.looksam_steps = 0  # looksam: its ascending steps so far; each k-th is a full SAM step

    def step(self, closure: Closure, lr: float) -> dict[str, Any]:
        return getattr(self, self.sam.variant)(closure, lr)

    # -- shared pieces -------------------------------------------------------------------------------
    def _keep_first(self, loss: Tensor) -> bool:
        if self.first_grads is None:
            self.first_grads = [torch.empty_like(g) for g in self.flat.grads]
        torch._foreach_copy_(self.first_grads, self.flat.grads)
        return True

    def _descend(self, loss: Tensor, ascent: Tensor | None, overflow: bool, lr: float) -> dict[str, Any]:
        checks = {} if overflow else {"loss": loss, **({"SAM ascent gradient norm": ascent} if ascent is not None else {})}
        return {"loss": loss, **self.method.base_update(self.flat.params, self.flat.grads, lr, checks)}

    # -- the variants --------------------------------------------------------------------------------
    def gsam(self, closure: Closure, lr: float) -> dict[str, Any]:
        """Descend with g' - alpha * g_perp, where g = g_par + g_perp splits g along g': the surrogate
        gap's gradient with the part that would also change the perturbed loss removed."""
        flat, alpha = self.flat, self.sam.gsam_alpha
        loss, ascent, overflow = self.method.ascend_and_grad(flat, closure, None, self.method.ascent_rho(lr),
                                                             prepare=self._keep_first)
        if not overflow:
            g, g_sam = self.first_grads, flat.grads
            g_norm, sam_norm = ops.total_sqnorm(g).sqrt(), ops.total_sqnorm(g_sam).sqrt()
            cosine = total_dot(g, g_sam) / (g_norm * sam_norm + EPS)
            along = cosine * g_norm / (sam_norm + EPS)  # g_par = along * g'
            axpby_(g_sam, g_sam, g, 1.0 + alpha * along, -alpha)  # g' - alpha (g - along g')
        return self._descend(loss, ascent, overflow, lr)

    def fsam(self, closure: Closure, lr: float) -> dict[str, Any]:
        """Ascend along g - sigma * m (m: EMA of the earlier steps' g), removing the full-batch part
        of the gradient from the ascent so that it follows the batch's own noise."""
        loss, ascent, overflow = self.method.ascend_and_grad(self.flat, closure, None, self.sam.rho,
                                                             prepare=self._friendly_direction)
        return self._descend(loss, ascent, overflow, lr)

    def _friendly_direction(self, loss: Tensor) -> bool:
        grads, scaler = self.flat.grads, self.method.scaler
        if scaler is not None:  # m stays in gradient units, and an overflowed g never reaches it
            if not bool(torch.isfinite(ops.total_sqnorm(grads)).all()):
                return False
            torch._foreach_mul_(grads, inverse_loss_scale(scaler))
        dist.all_reduce_mean_(grads)  # torchrun: one m on every rank (the ascent is then the global batch's)
        if self.momentum is None:
            self.momentum = [g.clone() for g in grads]  # the authors' first step: m = g, the ascent along g
        else:
            fsam_direction_(grads, self.momentum, self.sam.fsam_sigma, self.sam.fsam_lambda)
        return True

    def wsam(self, closure: Closure, lr: float) -> dict[str, Any]:
        """Minimise L + weight * (L(w + e) - L(w)), weight = gamma / (1 - gamma): the gradient
        g + weight * (g' - g); decoupled, the base optimizer steps with g alone and the sharpness term
        moves w by -lr * weight * (g' - g) after it."""
        flat, weight = self.flat, self.sam.wsam_gamma / (1.0 - self.sam.wsam_gamma)
        loss, ascent, overflow = self.method.ascend_and_grad(flat, closure, None, self.sam.rho, prepare=self._keep_first)
        if overflow:
            return self._descend(loss, ascent, overflow, lr)
        g, g_sam = self.first_grads, flat.grads
        if not self.sam.wsam_decouple:
            axpby_(g_sam, g_sam, g, weight, 1.0 - weight)
            return self._descend(loss, ascent, overflow, lr)
        if self.sharpness is None:
            self.sharpness = [torch.empty_like(v) for v in g]
        axpby_(self.sharpness, g_sam, g, 1.0, -1.0)
        torch._foreach_copy_(g_sam, g)
        unscale = inverse_loss_scale(self.method.scaler)  # before the update may change the scale
        metrics = self._descend(loss, ascent, overflow, lr)
        if not metrics.get("overflow"):
            dist.all_reduce_mean_(self.sharpness)  # the global batch's, as the descent's gradient
            axpby_(flat.params, flat.params, self.sharpness, 1.0, -lr * weight * unscale)
        return metrics

    def msam(self, closure: Closure, lr: float) -> dict[str, Any]:
        """One pass: the gradient at w - rho * v / ||v||, v the base optimizer's momentum (its update
        direction is -v, so this is a step back along it: an ascent), then the step from w with it."""
        flat, method = self.flat, self.method
        key = MOMENTUM_STATE[type(method.optimizer).__name__]
        velocity = [method.optimizer.state.get(p, {}).get(key) for p in flat.params]
        if any(v is None for v in velocity):  # before the first step there is no momentum: a plain step
            loss = closure(backward=True)
            return self._descend(loss, None, False, lr)
        ops.sam_perturb_(flat.params, velocity, method.backups, -self.sam.rho, self.sam.norm, self.sam.adaptive,
                         method.norm_masks)
        try:
            loss = closure(backward=True)  # the step's one pass; BatchNorm statistics update here
        finally:
            ops.restore_(flat.params, method.backups)
        return self._descend(loss, None, False, lr)

    def esam(self, closure: Closure, lr: float) -> dict[str, Any]:
        """Stochastic weight perturbation: a seeded random fraction beta of the weights moves (the norm
        is then theirs, so the step still has length rho). Sharpness-sensitive data selection: the
        second pass uses only the fraction gamma of the examples whose loss rose most at w + e, found
        by a forward pass without gradient."""
        method = self.method
        masks = self._random_weights(method.steps_taken - 1) if self.sam.esam_beta < 1 else None
        if masks is not None and method.norm_masks is not None:
            masks = [a * b for a, b in zip(masks, method.norm_masks)]

        def selected_pass() -> None:
            rise = closure.losses() - closure.example_losses  # (B,): each example's sharpness
            chosen = torch.zeros_like(rise, dtype=torch.bool)
            chosen[rise.topk(max(1, int(len(rise) * self.sam.esam_gamma))).indices] = True
            closure.selected(chosen, update_bn=False)

        second = selected_pass if self.sam.esam_gamma < 1 else None
        loss, ascent, overflow = method.ascend_and_grad(self.flat, closure, None, self.sam.rho, masks=masks,
                                                        second=second)
        return self._descend(loss, ascent, overflow, lr)

    def _random_weights(self, step: int) -> list[Tensor]:
        """(N,) 0/1 per vector, each weight 1 with probability beta, seeded by the run's seed and the
        step: the same on every rank and after a resume."""
        masks = []
        for i, w in enumerate(self.flat.params):
            draw = torch.Generator(device=w.device).manual_seed(self.method.cfg.seed * 1_000_003 + step * 31 + i)
            masks.append((torch.rand(w.shape, generator=draw, device=w.device) < self.sam.esam_beta).to(w.dtype))
        return masks

    def looksam(self, closure: Closure, lr: float) -> dict[str, Any]:
        """Every k-th ascending step a full SAM step that keeps g_v = g' - (g.g'/|g|^2) g, the part of
        g' orthogonal to g; in between one pass, descending with g + alpha |g|/|g_v| g_v."""
        flat, sam = self.flat, self.sam
        full = self.looksam_steps % sam.looksam_k == 0 or self.orthogonal is None
        self.looksam_steps += 1
        if not full:
            loss = closure(backward=True)
            g = flat.grads
            coef = sam.looksam_alpha * ops.total_sqnorm(g).sqrt() / (ops.total_sqnorm(self.orthogonal).sqrt() + 1e-8)
            axpby_(g, g, self.orthogonal, 1.0, coef)
            return self._descend(loss, None, False, lr)
        loss, ascent, overflow = self.method.ascend_and_grad(flat, closure, None, sam.rho, prepare=self._keep_first)
        if not overflow:
            g, g_sam = self.first_grads, flat.grads
            if self.candidate is None:
                self.candidate = [torch.empty_like(v) for v in g]
            along = total_dot(g, g_sam) / (ops.total_sqnorm(g) + EPS)
            axpby_(self.candidate, g_sam, g, 1.0, -along)
            dist.all_reduce_mean_(self.candidate)  # torchrun: one g_v on every rank
        metrics = self._descend(loss, ascent, overflow, lr)
        if not overflow and not metrics.get("overflow"):
            self.orthogonal, self.candidate = self.candidate, self.orthogonal
        return metrics

    # -- state across steps: what a checkpoint must hold for a bitwise resume -------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.momentum is not None:
            state["fsam_momentum"] = self.momentum
        if self.orthogonal is not None:
            state["looksam_orthogonal"] = self.orthogonal
        if self.sam.variant == "looksam":
            state["looksam_steps"] = self.looksam_steps
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fsam_momentum") is not None:
            self.momentum = [m.clone() for m in state["fsam_momentum"]]
        if state.get("looksam_orthogonal") is not None:
            self.orthogonal = [v.clone() for v in state["looksam_orthogonal"]]
        self.looksam_steps = int(state.get("looksam_steps", 0))
