"""Drop-ins with the signatures users already know, on the one-launch path when params are flat
(the SAM variants: optim/sam_family.py).

    opt = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn().backward(); opt.first_step(zero_grad=True); loss_fn().backward(); opt.second_step()
    fastflat.clip_grad_norm_(model.parameters(), max_norm=1.0)
    swa = fastflat.AveragedModel(model); swa.update_parameters(model)    # or decay=0.999 for an EMA

`SAM` follows the widely used PyTorch SAM optimizer (davda54/sam): same constructor, `first_step`,
`second_step`, `step(closure)`, per-group `rho` / `adaptive`. Two deliberate differences: the restore
copies the saved weights back in place (never `p.data = old`, which would detach a flat buffer), and
`zero_grad` zeroes flat gradient buffers in place instead of setting them to None.

fp16 with torch's GradScaler: pass it to both steps (the ascent needs no unscaling: e depends on g
only through g/||g|| or sign(g)); `scaler.unscale_(opt)` before clipping works as usual:

    scaler.scale(loss_fn()).backward(); opt.first_step(zero_grad=True, scaler=scaler)
    scaler.scale(loss_fn()).backward(); scaler.unscale_(opt); fastflat.clip_grad_norm_(params, 1.0)
    opt.second_step(zero_grad=True, scaler=scaler); scaler.update()

A first gradient that overflowed is neither used nor zeroed: the second backward adds to its inf, so
the scaler skips the step and halves the scale, and the weights never leave w.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fastflat import ops
from fastflat.flat import check_flattened_views, flatten, paired_covers


def _with_grads(params: Iterable[Tensor]) -> list[Tensor]:
    return [p for p in params if p.grad is not None]


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
    error_if_nonfinite: bool = False, foreach: bool | None = None,
) -> Tensor:
    """torch.nn.utils.clip_grad_norm_, on the one-launch path when the gradients tile flat buffers.

    Same arguments, return, dtypes, warning and error as torch's (its own tests run against this in
    tests/test_optim_torch.py): each buffer's norm is accumulated in fp32 (fp64 for fp64) and
    returned in the buffer's dtype (an fp16 norm above 65504 is inf, as torch's), the total in the
    widest of them; with error_if_nonfinite the gradients are untouched when it raises. Norms other
    than L2, or gradients that are not views of a flat buffer, go to torch's own implementation.
    """
    if isinstance(parameters, Tensor):
        params = [parameters]
    else:
        generator = isinstance(parameters, types.GeneratorType)
        params = list(parameters)
        if generator and not params:  # torch warns here; it cannot once we pass it a list
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = [p.grad for p in params if p.grad is not None]
    covers = paired_covers(grads, grads) if grads and float(norm_type) == 2.0 else None
    if covers is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    vectors = [g for g, _ in covers]
    norms = [ops.sqnorm(v).sqrt().to(v.dtype) for v in vectors]  # (1,) each, like torch._foreach_norm
    total_norm = torch.linalg.vector_norm(torch.stack([n.reshape(()).to(vectors[0].device) for n in norms]))
    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`")
    ops.clip_scale_(vectors, total_norm, float(max_norm))
    return total_norm


class FlatZeroGrad:
    """zero_grad for optimizers over flat buffers: gradients that are views of one are zeroed in place (set
    to None, they would leave the buffer); any others as torch.optim.Optimizer does. A mixin before it."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params and paired_covers(params, [p.grad for p in params]) is not None:
            for p in params:  # views of a flat buffer: keep them, zero in place
                p.grad.zero_()
        else:
            super().zero_grad(set_to_none=set_to_none)


class SAM(FlatZeroGrad, torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any base optimizer (Foret et al. 2021; ASAM: Kwon et al.).

    `norm="linf"` takes the ascent step inside an L-inf ball (e = rho * sign(g)) instead of L2.
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, norm: str = "l2", **kwargs):
        if rho < 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        if norm not in ops.SAM_NORMS:
            raise ValueError(f"Invalid norm {norm!r}: use one of {', '.join(ops.SAM_NORMS)}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, norm=norm, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._flat_backups: list[tuple[Tensor, Tensor]] = []  # (param cover, saved copy)
        self._scaled_second_step = False  # GradScaler.step(self) is running second_step's base step

    # -- the one-launch path ---------------------------------------------------------------------
    def _flat_covers(self) -> list[tuple[Tensor, Tensor]] | None:
        settings = {(g["rho"], g["adaptive"], g["norm"]) for g in self.param_groups}
        if len(settings) != 1:
            return None  # per-group rho: the foreach path scales each group on its own
        params = _with_grads(p for g in self.param_groups for p in g["params"])
        return paired_covers(params, [p.grad for p in params]) if params else None

    # -- state: the base optimizer's is carried too, so momentum survives a resume ---------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base_optimizer": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also takes the popular SAM optimizer's state_dicts (no `norm`, no base state). Afterwards
        param_groups are still the base optimizer's, so a loaded lr, and a scheduler attached later,
        reach the step that uses them."""
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_optimizer", None)
        super().load_state_dict(state_dict)
        if base_state is not None:  # its momentum; the hyperparameters are the top-level groups'
            self.base_optimizer.load_state_dict({"state": base_state["state"], "param_groups": state_dict["param_groups"]})
        else:  # keep the loaded hyperparameters in the groups the base optimizer steps with
            self.base_optimizer.param_groups = self.param_groups
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # e.g. `norm`, unknown to the original SAM
        for p in list(self.state):
            self.state[p].pop("old_p", None)  # a perturbation in flight when saved: meaningless now

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        check_flattened_views(p for g in self.param_groups for p in g["params"])
        if scaler is not None and scaler.is_enabled():
            grads = [p.grad for p in _with_grads(p for g in self.param_groups for p in g["params"])]
            if grads and not bool(torch.stack([torch.isfinite(g).all().to(grads[0].device) for g in grads]).all()):
                return  # overflow: no ascent, and the inf stays in .grad for the scaler to find

        covers = self._flat_covers()
        if covers is not None:
            group = self.param_groups[0]
            ws, gs = [w for w, _ in covers], [g for _, g in covers]
            backups = [torch.empty_like(w) for w in ws]
            ops.sam_perturb_(ws, gs, backups, group["rho"], group["norm"], group["adaptive"])
            self._flat_backups = list(zip(ws, backups))
        else:
            self._foreach_perturb()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        """Back to w, then the base optimizer's step; with a scaler, through scaler.step (which
        unscales unless scaler.unscale_(self) did, and skips a step whose gradient overflowed)."""
        if self._flat_backups:
            ops.restore_([w for w, _ in self._flat_backups], [b for _, b in self._flat_backups])
            self._flat_backups = []
        else:
            for group in self.param_groups:
                for p in group["params"]:
                    if "old_p" in self.state[p]:
                        p.copy_(self.state[p].pop("old_p"))
        if scaler is None:
            self.base_optimizer.step()
        else:
            self._scaled_second_step = True
            try:
                scaler.step(self)  # calls self.step() below when the gradient is finite
            finally:
                self._scaled_second_step = False
        self._opt_called = True  # what an LR scheduler checks: the optimizer did step before it
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """The popular SAM's step: the gradient at w is already in .grad; `closure` recomputes the loss
        and its gradient at w + e. Returns what the closure returned: the loss at w + e, the one SAM
        minimises (torch optimizers return their closure's loss too)."""
        if self._scaled_second_step:  # GradScaler.step(self) from second_step: the base step alone
            return self.base_optimizer.step()
        if closure is None:
            raise ValueError("SAM requires a closure that re-evaluates the loss and calls backward()")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        loss = closure()
        self.second_step()
        return loss

    # -- the per-tensor path (foreach) -----------------------------------------------------------
    def _foreach_perturb(self) -> None:
        def scaled(group, grads):
            params = _with_grads(group["params"])
            return torch._foreach_mul(grads, torch._foreach_abs(params)) if group["adaptive"] else grads

        groups = [(g, [p.grad for p in _with_grads(g["params"])]) for g in self.param_groups]
        norms = [n for g, grads in groups if grads for n in torch._foreach_norm(scaled(g, grads))]
        if not norms:
            return
        grad_norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        for group, grads in groups:
            params = _with_grads(group["params"])
            if not params:
                continue
            for p in params:
                self.state[p]["old_p"] = p.detach().clone()
            if group["norm"] == "l2":
                steps = torch._foreach_mul(grads, group["rho"] / (grad_norm + 1e-12))
                if group["adaptive"]:
                    steps = torch._foreach_mul(steps, torch._foreach_mul(params, params))
            else:
                steps = torch._foreach_mul(torch._foreach_sign(grads), group["rho"])
                if group["adaptive"]:
                    steps = torch._foreach_mul(steps, torch._foreach_abs(params))
            torch._foreach_add_(params, steps)


class AveragedModel(torch.optim.swa_utils.AveragedModel):
    """torch.optim.swa_utils.AveragedModel, with one fused launch per flat buffer per update.

    Same constructor and `update_parameters` / `n_averaged`, plus `decay`: EMA with that decay (what
    `multi_avg_fn=get_ema_multi_avg_fn(decay)` computes), running mean (SWA) when None. Without a custom
    avg_fn / multi_avg_fn the averaged copy is flattened, and an update from a model whose params tile
    flat buffers in the same order reads the count on the device: no host sync. Any other model (plain,
    `.to()`-moved, frozen params) goes through torch's own update_parameters.
    """

    def __init__(self, model: torch.nn.Module, device: int | torch.device | None = None,
                 avg_fn: Callable | None = None, multi_avg_fn: Callable | None = None,
                 use_buffers: bool = False, *, decay: float | None = None):
        if decay is not None and (avg_fn is not None or multi_avg_fn is not None):
            raise ValueError("give either decay or avg_fn / multi_avg_fn, not both")
        ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(decay) if decay is not None else None
        super().__init__(model, device, avg_fn, multi_avg_fn or ema_fn, use_buffers)
        self.decay = decay
        self._ema_fn = ema_fn  # the fallback's averaging function for `decay`: ours to fuse
        params = list(self.module.parameters())
        if self._fusable() and any(p.requires_grad for p in params):
            flatten(self.module)
            # torch leaves n_averaged on the CPU when device is None: keep it beside the weights instead,
            # so reading the count never crosses to the host
            self.n_averaged = self.n_averaged.to(params[0].device)

    def _fusable(self) -> bool:
        return self.avg_fn is None and self.multi_avg_fn is self._ema_fn

    def _flat_pairs(self, model: torch.nn.Module) -> list[tuple[Tensor, Tensor]] | None:
        """(average, source) vectors, one per flat buffer, or None when the fused path does not apply."""
        mine, theirs = list(self.module.parameters()), list(model.parameters())
        my_buffers, their_buffers = list(self.module.buffers()), list(model.buffers())
        if not self._fusable() or len(mine) != len(theirs) or len(my_buffers) != len(their_buffers):
            return None
        if not all(b.is_contiguous() for b in my_buffers + their_buffers):
            return None  # the kernel reads buffers as flat vectors
        covers = paired_covers(mine, theirs)
        # a plain model tiles trivially, one param per run: flat means one run per (device, dtype)
        if covers is None or len(covers) > len({(p.device, p.dtype) for p in theirs}):
            return None
        return [(avg, w.to(avg.device)) for avg, w in covers]

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        pairs = self._flat_pairs(model)
        if pairs is None:
            super().update_parameters(model)
            return
        ops.average_([a for a, _ in pairs], [w for _, w in pairs], self.n_averaged, self.decay)
        self._update_buffers(model)
        self.n_averaged += 1

    def _update_buffers(self, model: torch.nn.Module) -> None:
        pairs = [(a, b.detach().to(a.device)) for a, b in zip(self.module.buffers(), model.buffers())]
        if not pairs:
            return
        if not self.use_buffers:  # torch keeps buffers in sync with the source model, integers included
            torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])
            return
        floats = [(a, b) for a, b in pairs if a.is_floating_point()]
        ops.average_([a for a, _ in floats], [b for _, b in floats], self.n_averaged, self.decay)
        for avg, b in pairs:
            if not avg.is_floating_point():
                _average_integers_(avg, b, self.n_averaged.to(avg.device), self.decay)


def _average_integers_(avg: Tensor, w: Tensor, count: Tensor, decay: float | None) -> None:
    """Torch's rule for integer buffers (num_batches_tracked): fp32 math truncated back; first copies."""
    mixed = avg * decay + w * (1 - decay) if decay is not None else avg + (w - avg) / (count + 1)
    avg.copy_(torch.where(count == 0, w, mixed.to(avg.dtype)))
