"""Full-batch gradient descent with an explicit gradient-norm penalty (Geiping et al. 2022, "Stochastic
training is not necessary for generalization").

The closure covers the whole training set (closures.SplitClosure, in chunks); one step is one pass.
With --gradreg the objective is L(w) + (tau/4) ||grad L(w)||^2, whose gradient is g + (tau/2) H g:

    finite:  H g ~ (grad L(w + eps g/||g||) - g) ||g|| / eps      one more pass, w restored exactly
    exact:   H g = grad <grad L(w), stop(g)>                      double backward, the reference

tau = strength * lr / 2 unless --tau is given, so the update adds (lr/4) * strength * H g, the rule of
the paper's code (strength 0.5 there). With --gradreg-block b the penalty is taken per block of b
examples and averaged ("strong regularization", b = 32 in the paper): each block costs two passes of
its own, and the mean of the blocks' gradients is the full gradient, so nothing else is computed.

Under torchrun each rank holds 1/N of the set. Blocks stay inside a rank, so blocked penalties need no
extra communication; the whole-set penalty all-reduces g first (one more all-reduce a step), since the
finite difference and the HVP must follow the global g: each rank's g + (tau/2) H_r g then averages to
the whole set's g + (tau/2) H g in base_update's all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fastflat import ops
from fastflat.data.datasets import augmented_copies
from fastflat.errors import UserError
from fastflat.flat import FlatParams
from fastflat.loss.hessian import hvp
from fastflat.methods.base import Closure, Method
from fastflat.ops import dist
from fastflat.settings import enum_of, setting

GradReg = enum_of("GradReg", "off", "finite", "exact")


@dataclass(frozen=True)
class FullBatchConfig:
    chunk_size: int = setting(1024, "Examples per forward/backward chunk of the full-batch pass (memory, not result).",
                              option="chunk_size")
    gradreg: str = setting("off", "Gradient-norm penalty (tau/4)||grad L||^2: finite differences, or exact double backward.",
                           option="gradreg", choices=GradReg)
    strength: float = setting(0.5, "s: tau = s * lr / 2, so the update adds (lr/4) s H g (the paper's code: 0.5).",
                              option="gradreg_strength")
    tau: float | None = setting(None, "Set tau directly instead of tying it to the step size.", option="tau")
    eps: float = setting(0.01, "Finite-difference step along g/||g||, in weight units.", option="gradreg_eps")
    block: int = setting(0, "Penalty per block of b examples, averaged (0 = whole set; the paper's strong reg.: 32).",
                         option="gradreg_block")
    shuffle: bool = setting(False, "Re-draw which examples form the blocks every step.", option="shuffle_blocks")
    fixed_augment: int = setting(0, "K > 0: K augmented copies of the training set, made once; none after.",
                                 option="fixed_augment")

    def check(self, cfg: Any, need: Any) -> None:
        need(self.chunk_size >= 1, "chunk_size", "must be at least 1")
        need(self.strength >= 0, "strength", "must be >= 0")
        need(self.tau is None or self.tau >= 0, "tau", "must be >= 0")
        need(self.eps > 0, "eps", "must be > 0")
        need(self.block >= 0 and (self.block == 0 or (self.block <= self.chunk_size and self.chunk_size % self.block == 0)),
             "block", f"must be 0 (the whole set) or divide fullbatch.chunk_size = {self.chunk_size}")
        need(self.fixed_augment >= 0, "fixed_augment", "must be >= 0")


class FullBatch(Method):
    name = "fullbatch"
    summary = "Full-batch gradient descent, optionally with the gradient-norm penalty (Geiping et al. 2022)."
    config = FullBatchConfig
    panel = "Full batch (--method fullbatch)"
    defaults = {"nesterov": True}  # the paper's GD: momentum 0.9 with Nesterov, weight decay 5e-4
    settings_need_method = True
    whole_set_steps = True
    batched = False
    fp16 = False

    def prepare_data(self, data: Any) -> Any:
        """--fixed-augment K: K augmented copies made once, none afterwards."""
        if not self.cfg.fullbatch.fixed_augment:
            return data
        copies = augmented_copies(data.train, self.cfg.fullbatch.fixed_augment, self.cfg.seed)
        return replace(data, train=copies, augment="none")

    def check_data(self, train_size: int) -> None:
        """Chunks that fit the set; under torchrun, shares that divide it: each rank takes chunk_size / N of
        every chunk, so every rank holds examples / N of the set and the mean of the ranks' means is the set's."""
        fb, n = self.cfg.fullbatch, dist.world_size()
        if fb.chunk_size > train_size:
            raise UserError(f"fullbatch.chunk_size {fb.chunk_size} is larger than the {train_size} training examples")
        if n == 1:
            return
        if train_size % n or fb.chunk_size % n:
            raise UserError(f"--method fullbatch on {n} processes needs the training-set size ({train_size}) and "
                            f"--chunk-size ({fb.chunk_size}) divisible by {n}: use --subset {train_size - train_size % n} "
                            f"and --chunk-size {max(n, fb.chunk_size - fb.chunk_size % n)}")
        if fb.block and (fb.chunk_size // n) % fb.block:
            raise UserError(f"--gradreg-block {fb.block} must divide each process's share of a chunk "
                            f"({fb.chunk_size} / {n} = {fb.chunk_size // n}): use --chunk-size "
                            f"{fb.block * n * max(1, fb.chunk_size // (fb.block * n))}")

    def init(self, flat: FlatParams, services=None) -> None:
        super().init(flat, services)
        self.backups = [torch.empty_like(w) for w in flat.params]  # (N,): w during the finite difference
        self.total = [torch.empty_like(g) for g in flat.grads]  # (N,): the step's accumulated gradient

    def tau(self, lr: float) -> float:
        fb = self.cfg.fullbatch
        return fb.tau if fb.tau is not None else fb.strength * lr / 2

    def step(self, flat: FlatParams, closure: Closure, lr: float) -> dict[str, Any]:
        fb = self.cfg.fullbatch
        if fb.gradreg == "off":
            loss = closure(backward=True)
            return {"loss": loss, **self.base_update(flat.params, flat.grads, lr, {"loss": loss})}
        n = closure.batch_size
        size = fb.block or n
        for t in self.total:
            t.zero_()
        loss = torch.zeros((), device=flat.params[0].device)
        for start in range(0, n, size):
            part = slice(start, min(start + size, n)) if fb.block else None
            weight = ((part.stop - part.start) / n) if part is not None else 1.0
            block_loss = closure(backward=True, part=part)  # g of this block (or of the whole set)
            if part is None:  # torchrun: perturb along the whole set's g; each rank's H_r g then averages to H g
                dist.all_reduce_mean_(flat.grads)
            grads = [g.clone() for g in flat.grads]
            hvp = self._hvp(flat, closure, part, grads)  # H g, in flat.grads' layout
            half_tau = self.tau(lr) / 2
            torch._foreach_add_(self.total, [g + half_tau * h for g, h in zip(grads, hvp)], alpha=weight)
            loss = loss + weight * block_loss
        for g, t in zip(flat.grads, self.total):
            g.copy_(t)
        return {"loss": loss, **self.base_update(flat.params, flat.grads, lr, {"loss": loss})}

    def _hvp(self, flat: FlatParams, closure: Closure, part: slice | None, g: list[Tensor]) -> list[Tensor]:
        if self.cfg.fullbatch.gradreg == "exact":
            return exact_hvp(flat, closure, part, g)
        return self._finite_hvp(flat, closure, part, g)

    @torch.no_grad()
    def _finite_hvp(self, flat: FlatParams, closure: Closure, part: slice | None, g: list[Tensor]) -> list[Tensor]:
        """(grad L(w + eps g/||g||) - g) * ||g|| / eps; w is copied back bit for bit, whatever happens."""
        eps = self.cfg.fullbatch.eps
        norm = ops.total_sqnorm(g).sqrt()  # (1,) on the device: no host sync
        scale = eps / (norm + 1e-12)
        for w, b, gi in zip(flat.params, self.backups, g):
            b.copy_(w)
            w.add_(gi * scale.to(w.dtype))
        try:
            with torch.enable_grad():
                closure(backward=True, part=part, update_bn=False)
        finally:
            ops.restore_(flat.params, self.backups)
        return [(shifted - gi) / scale.to(gi.dtype) for shifted, gi in zip(flat.grads, g)]


def exact_hvp(flat: FlatParams, closure: Closure, part: slice | None, v: list[Tensor]) -> list[Tensor]:
    """H v by double backward over the closure's data (the block `part`, or the whole split)."""
    return hvp(flat, _chunks_of(closure, part), v, closure.amp)


def _chunks_of(closure: Closure, part: slice | None) -> list[tuple[Tensor, Tensor]]:
    return [closure.block(part)] if part is not None else closure.chunks
