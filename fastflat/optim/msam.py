"""Momentum-SAM as its authors' optimizer class (fastflat.MSAM); the trainer's is --sam-variant msam.

    opt = fastflat.MSAM(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.3)
    loss_fn().backward(); opt.step(); opt.zero_grad()          # one pass a step, as SGD
    opt.move_back_from_momentumAscent()                          # before evaluating: the weights w
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastflat import ops


class MSAM(torch.optim.Optimizer):
    """Momentum-SAM (Becker et al., 2024), with its authors' constructor and protocol: SGD whose gradient
    is taken at w - rho * v/||v||, v the momentum, at no extra pass. Between steps the model holds those
    perturbed weights (each step() moves back, steps, and moves to the next ones), so call
    move_back_from_momentumAscent() before evaluating or saving, and move_up_to_momentumAscent() to go on.
    Weight decay is added to the gradient at the perturbed weights, as the authors' code does."""

    def __init__(self, params, lr: float = 1e-1, momentum: float = 0.9, weight_decay: float = 1e-2,
                 nesterov: bool = False, rho: float = 0.3):
        if nesterov:
            raise ValueError("MSAM's authors define it for plain momentum; nesterov is not supported")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False, rho=rho))
        if len(self.param_groups) > 1:
            raise ValueError("MSAM takes one parameter group (as its authors' code)")
        for p in self.param_groups[0]["params"]:
            self.state[p]["momentum_buffer"] = torch.zeros_like(p).detach()  # the first ascent is then nothing
        self.param_groups[0]["inverse_norm_buffer"] = 0.0

    def _vectors(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        params = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        return [p.detach().view(-1) for p in params], [p.grad.view(-1) for p in params], [b.view(-1) for b in bufs]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        ws, gs, bufs = self._vectors()
        if group["weight_decay"]:
            torch._foreach_add_(gs, ws, alpha=group["weight_decay"])
        torch._foreach_add_(ws, bufs, alpha=group["rho"] * group["inverse_norm_buffer"])  # back to w
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, gs)
        torch._foreach_add_(ws, bufs, alpha=-group["lr"])  # the SGD step
        group["inverse_norm_buffer"] = 1.0 / (float(ops.total_sqnorm(bufs).sqrt()) + 1e-12)
        torch._foreach_add_(ws, bufs, alpha=-group["rho"] * group["inverse_norm_buffer"])  # to the next w - rho v/|v|
        return loss

    @torch.no_grad()
    def move_up_to_momentumAscent(self) -> None:  # noqa: N802 (the authors' name)
        group = self.param_groups[0]
        for p in group["params"]:
            p.sub_(self.state[p]["momentum_buffer"], alpha=group["rho"] * group["inverse_norm_buffer"])

    @torch.no_grad()
    def move_back_from_momentumAscent(self) -> None:  # noqa: N802
        group = self.param_groups[0]
        for p in group["params"]:
            p.add_(self.state[p]["momentum_buffer"], alpha=group["rho"] * group["inverse_norm_buffer"])
