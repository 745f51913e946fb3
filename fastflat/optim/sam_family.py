"""Drop-ins for the SAM variants whose original is an optimizer class, on the fused flat-vector ops.

    opt = fastflat.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt = fastflat.LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=5, lr=0.1)
    opt = fastflat.WSAM(model, model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, lr=0.1)
    opt = fastflat.GSAM(params, torch.optim.SGD(params, lr=0.1), model, rho_scheduler, alpha=0.4)
    opt = fastflat.MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.3)       # optim/msam.py

The constructors and step protocols are those of pytorch_optimizer's classes of the same names (MSAM: its
authors' optimizer), and tests/test_optim_sam.py checks 20 steps of each against them. Where the original
departs from its paper, these follow the paper and say so in the class. The weights and gradients are read
as vectors: the flat buffers when the parameters are views of them (fastflat.flatten: one fused launch per
pass), else one view per parameter tensor; norms and dot products are global either way.

First / second step with torch's GradScaler (FriendlySAM, LookSAM, WSAM), as for fastflat.SAM:

    scaler.scale(loss_fn()).backward(); opt.first_step(zero_grad=True, scaler=scaler)
    scaler.scale(loss_fn()).backward(); opt.second_step(zero_grad=True, scaler=scaler); scaler.update()

A first gradient that overflowed is left in .grad and nothing moves; the second backward adds to its inf,
so the scaler skips the step. State kept across steps (F-SAM's m, LookSAM's g_v) takes finite gradients only.

Under DDP, as fastflat.SAM: the first backward inside model.no_sync() (each rank ascends with its own
gradient), the second one DDP's. WSAM averages its first gradient over the ranks (its base step takes it),
and LookSAM its g_v (reused on the steps between, whose one backward is DDP's): the ranks stay equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fastflat import ops
from fastflat.flat import check_flattened_views, paired_covers
from fastflat.loss.closures import frozen_bn_stats
from fastflat.ops import dist
from fastflat.optim import FlatZeroGrad
from fastflat.ops.sam_family import axpby_, fsam_direction_, total_dot

EPS = 1e-12


def _unscale_factor(scaler: torch.amp.GradScaler | None) -> Tensor | float:
    return 1.0 if scaler is None or not scaler.is_enabled() else scaler._scale.double().reciprocal().float()


class _SAMFamily(FlatZeroGrad, torch.optim.Optimizer):
    """What the variants share: the base optimizer, the weights and gradients as vectors, an exact
    perturb-and-restore, state that travels in state_dict, and the second step through a GradScaler."""

    def _adopt(self, base_optimizer: Any, kwargs: dict[str, Any]) -> None:
        made = isinstance(base_optimizer, type)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs) if made else base_optimizer
        self.param_groups = self.base_optimizer.param_groups
        for key, value in self.base_optimizer.defaults.items():
            self.defaults.setdefault(key, value)
        self.vectors_state: dict[str, Any] = {}  # per-vector state (momentum, g_v) and counters
        self._backups: list[Tensor] = []
        self._in_scaled_step = False

    def _vectors(self) -> tuple[list[Tensor], list[Tensor]]:
        """(weights, gradients) as (N,) vectors: flat buffers when the params tile them, else per tensor."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        check_flattened_views(params)
        covers = paired_covers(params, [p.grad for p in params]) if params else None
        if covers is not None:
            return [w for w, _ in covers], [g for _, g in covers]
        return [p.detach().view(-1) for p in params], [p.grad.view(-1) for p in params]

    def _perturb(self, ws: list[Tensor], directions: list[Tensor], rho: float, adaptive: bool) -> None:
        self._backups = [torch.empty_like(w) for w in ws]
        ops.sam_perturb_(ws, directions, self._backups, rho, "l2", adaptive)
        self._perturbed = ws

    def _restore(self) -> None:
        if self._backups:
            ops.restore_(self._perturbed, self._backups)
            self._backups = []

    def _overflowed(self, gs: list[Tensor], scaler: torch.amp.GradScaler | None) -> bool:
        return scaler is not None and scaler.is_enabled() and not bool(torch.isfinite(ops.total_sqnorm(gs)).all())

    def _base_step(self, scaler: torch.amp.GradScaler | None) -> None:
        if scaler is None:
            self.base_optimizer.step()
        else:
            self._in_scaled_step = True
            try:
                scaler.step(self)  # unscales unless done, skips an overflowed step, calls self.step()
            finally:
                self._in_scaled_step = False
        self._opt_called = True  # what an LR scheduler checks

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base_optimizer": self.base_optimizer.state_dict(),
                "fastflat_vectors": self.vectors_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_optimizer", None)
        self.vectors_state = dict(state_dict.pop("fastflat_vectors", {}))
        super().load_state_dict(state_dict)
        if base_state is not None:
            self.base_optimizer.load_state_dict(base_state)
        self.param_groups = self.base_optimizer.param_groups


class FriendlySAM(_SAMFamily):
    """Friendly SAM (Li et al., CVPR 2024): ascend along g - sigma * m, m the EMA (lmbda) of earlier
    gradients, so that the ascent follows the batch's own noise rather than the full gradient. The first
    step sets m = g and ascends along g, as the authors' code and pytorch_optimizer do."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9,
                 adaptive: bool = False, perturb_eps: float = 1e-12, foreach: bool | None = None, **kwargs):
        if rho < 0 or sigma < 0 or lmbda < 0 or perturb_eps < 0:
            raise ValueError("rho, sigma, lmbda and perturb_eps must be >= 0")
        super().__init__(params, dict(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive, **kwargs))
        self.perturb_eps = perturb_eps
        self._adopt(base_optimizer, kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        ws, gs = self._vectors()
        if self._overflowed(gs, scaler):
            return
        group = self.param_groups[0]
        if scaler is not None:
            torch._foreach_mul_(gs, _unscale_factor(scaler))  # m in gradient units, whatever the scale
        momentum = self.vectors_state.get("momentum")
        if momentum is None:
            self.vectors_state["momentum"] = [g.clone() for g in gs]
        else:
            fsam_direction_(gs, momentum, group["sigma"], group["lmbda"])
        self._perturb(ws, gs, group["rho"], group["adaptive"])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        self._restore()
        self._base_step(scaler)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """The gradient at w is already in .grad; `closure` recomputes loss and gradient at w + e."""
        if self._in_scaled_step:
            return self.base_optimizer.step()
        if closure is None:
            raise ValueError("FriendlySAM requires a closure that recomputes the loss and calls backward()")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss


class LookSAM(_SAMFamily):
    """LookSAM (Liu et al., CVPR 2022): every k-th step a SAM step that keeps g_v = g' - (g.g'/|g|^2) g,
    the part of the SAM gradient orthogonal to g; in between, g + alpha |g|/|g_v| g_v with no second pass.

    Two departures of pytorch_optimizer's LookSAM from the paper, not copied here: its step(closure) runs
    the closure on every step (so it costs two passes a step, like SAM), and it splits g' along g tensor
    by tensor. Here step(closure) calls the closure on the k-th steps only, and the split is over all
    weights at once (the paper's g, g' and g_v are whole-model vectors). `use_gc` (gradient
    centralisation) is not in the paper and is refused."""

    def __init__(self, params, base_optimizer, rho: float = 0.1, k: int = 10, alpha: float = 0.7,
                 adaptive: bool = False, use_gc: bool = False, perturb_eps: float = 1e-12,
                 foreach: bool | None = None, **kwargs):
        if rho < 0 or k < 1 or not 0 < alpha < 1:
            raise ValueError("need rho >= 0, k >= 1 and 0 < alpha < 1")
        if use_gc:
            raise ValueError("use_gc (gradient centralisation) is not part of LookSAM's paper; not supported")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.k, self.alpha, self.perturb_eps = k, alpha, perturb_eps
        self._adopt(base_optimizer, kwargs)
        self.vectors_state["step"] = 0

    def full_step(self) -> bool:
        """Whether this step is a SAM step (its first_step perturbs, and a second pass must follow)."""
        return self.vectors_state["step"] % self.k == 0 or "orthogonal" not in self.vectors_state

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        if not self.full_step():
            return  # the gradient at w stays in .grad for second_step
        ws, gs = self._vectors()
        if self._overflowed(gs, scaler):
            return
        self._first = [g.clone() for g in gs]
        self._perturb(ws, gs, self.param_groups[0]["rho"], self.param_groups[0]["adaptive"])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        self._restore()
        _, gs = self._vectors()
        first = getattr(self, "_first", None)
        if self.full_step() and first is not None:
            along = total_dot(first, gs) / (ops.total_sqnorm(first) + EPS)
            orthogonal = [torch.empty_like(g) for g in gs]
            axpby_(orthogonal, gs, first, 1.0, -along)
            dist.all_reduce_mean_(orthogonal)  # under DDP: one g_v on every rank, or their next steps differ
            if not self._overflowed(orthogonal, scaler):
                self.vectors_state["orthogonal"] = orthogonal
            self._first = None
        elif "orthogonal" in self.vectors_state:
            orthogonal = self.vectors_state["orthogonal"]
            coef = self.alpha * ops.total_sqnorm(gs).sqrt() / (ops.total_sqnorm(orthogonal).sqrt() + 1e-8)
            axpby_(gs, gs, orthogonal, 1.0, coef)
        self._base_step(scaler)
        self.vectors_state["step"] += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        """The gradient at w is already in .grad; `closure` recomputes it at w + e, on SAM steps only."""
        if self._in_scaled_step:
            return self.base_optimizer.step()
        if closure is None:
            raise ValueError("LookSAM requires a closure that recomputes the loss and calls backward()")
        if self.full_step():
            self.first_step(zero_grad=True)
            with torch.enable_grad():
                closure()
        self.second_step()


class WSAM(_SAMFamily):
    """Weighted SAM (Yue et al., KDD 2023): minimise L + gamma/(1-gamma) * (L(w + e) - L(w)). With
    `decouple` (the default, the paper's), the base optimizer steps with g and the sharpness term then
    moves w by -lr * gamma/(1-gamma) * (g' - g); else the base step takes g + gamma/(1-gamma) (g' - g).
    `max_norm` clips g' before the mix, as the original. step(closure) runs both passes: BatchNorm's
    running statistics are updated by the first only."""

    def __init__(self, model: nn.Module, params, base_optimizer, rho: float = 0.05, gamma: float = 0.9,
                 adaptive: bool = False, decouple: bool = True, max_norm: float | None = None, eps: float = 1e-12,
                 foreach: bool | None = None, **kwargs):
        if rho < 0 or not 0 <= gamma < 1:
            raise ValueError("need rho >= 0 and 0 <= gamma < 1")
        super().__init__(params, dict(rho=rho, alpha=gamma / (1 - gamma), adaptive=adaptive, **kwargs))
        self.model, self.decouple, self.max_norm = model, decouple, max_norm
        self._adopt(base_optimizer, kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        ws, gs = self._vectors()
        if self._overflowed(gs, scaler):
            return
        dist.all_reduce_mean_(gs)  # under DDP the base step takes g itself: the same g on every rank (as the original)
        self._first = [g * _unscale_factor(scaler) for g in gs]
        self._perturb(ws, gs, self.param_groups[0]["rho"], self.param_groups[0]["adaptive"])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        self._restore()
        if getattr(self, "_first", None) is None:  # the first gradient overflowed: the scaler skips this step
            self._base_step(scaler)
            if zero_grad:
                self.zero_grad()
            return
        if scaler is not None:
            scaler.unscale_(self)  # g' in gradient units, like the kept g
        ws, gs = self._vectors()
        if self.max_norm is not None:
            ops.clip_grad_norm_flat_(gs, self.max_norm)
        alpha, first = self.param_groups[0]["alpha"], self._first
        self._first = None
        if not self.decouple:
            axpby_(gs, gs, first, alpha, 1.0 - alpha)
            self._base_step(scaler)
        else:
            sharpness = [torch.empty_like(g) for g in gs]
            axpby_(sharpness, gs, first, 1.0, -1.0)
            torch._foreach_copy_(gs, first)
            self._base_step(scaler)
            if scaler is None or bool(torch.isfinite(ops.total_sqnorm(sharpness)).all()):
                axpby_(ws, ws, sharpness, 1.0, -self.param_groups[0]["lr"] * alpha)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        if self._in_scaled_step:
            return self.base_optimizer.step()
        if closure is None:
            raise ValueError("WSAM requires a closure that computes the loss and calls backward()")
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with frozen_bn_stats(self.model), torch.enable_grad():
            closure()
        self.second_step()
        return loss


class GSAM(_SAMFamily):
    """GSAM (Zhuang et al., ICLR 2022): descend with g' - alpha * g_perp, g_perp the part of g orthogonal
    to the SAM gradient g'; rho comes from `rho_scheduler.step()` (update_rho_t(), once per LR step):
    pytorch_optimizer's ProportionScheduler, or any object whose step() returns the radius. The closure
    (set_closure, or step(closure)) zeroes the gradient, runs forward and backward, returns (outputs, loss)."""

    def __init__(self, params, base_optimizer: torch.optim.Optimizer, model: nn.Module, rho_scheduler,
                 alpha: float = 0.4, adaptive: bool = False, perturb_eps: float = 1e-12, foreach: bool | None = None,
                 **kwargs):
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(params, dict(adaptive=adaptive, **kwargs))
        self.model, self.rho_scheduler, self.alpha, self.adaptive = model, rho_scheduler, alpha, adaptive
        self.forward_backward_func: Callable[[], tuple[Any, Tensor]] | None = None
        self._adopt(base_optimizer, kwargs)
        self.rho_t = 0.0
        self.update_rho_t()

    @torch.no_grad()
    def update_rho_t(self) -> float:
        self.rho_t = float(self.rho_scheduler.step())
        return self.rho_t

    def set_closure(self, loss_fn: Callable, inputs: Tensor, targets: Tensor, **kwargs) -> None:
        def get_grad() -> tuple[Any, Tensor]:
            self.zero_grad()  # in place on flat buffers (the base optimizer's own would detach their views)
            with torch.enable_grad():
                outputs = self.model(inputs)
                loss = loss_fn(outputs, targets, **kwargs)
            loss.backward()
            return outputs, loss.detach()

        self.forward_backward_func = get_grad

    @torch.no_grad()
    def step(self, closure: Callable[[], tuple[Any, Tensor]] | None = None) -> tuple[Any, Tensor]:
        if self._in_scaled_step:
            return self.base_optimizer.step()
        get_grad = closure or self.forward_backward_func
        if get_grad is None:
            raise ValueError("GSAM needs a closure: step(closure) or set_closure(loss_fn, inputs, targets)")
        outputs, loss = get_grad()
        ws, gs = self._vectors()
        first = [g.clone() for g in gs]
        self._perturb(ws, gs, self.rho_t, self.adaptive)
        try:
            with frozen_bn_stats(self.model):
                get_grad()
        finally:
            self._restore()
        _, gs = self._vectors()
        g_norm, sam_norm = ops.total_sqnorm(first).sqrt(), ops.total_sqnorm(gs).sqrt()
        along = total_dot(first, gs) / (g_norm * sam_norm + EPS) * g_norm / (sam_norm + EPS)
        axpby_(gs, gs, first, 1.0 + self.alpha * along, -self.alpha)
        self._base_step(None)
        return outputs, loss
