"""Closures: a method's view of "the loss here" (see methods.Closure), built by the trainer per step.

    closure = BatchClosure(model, flat, x, y, amp="none")          # one batch
    closure = SplitClosure(model, flat, [(x1, y1), (x2, y2)], amp)   # a whole split, in chunks

Calling one with backward=True zeroes the flat gradient once and fills it; both tally the training
loss and accuracy of the first pass over each part, which every method takes at unperturbed weights.
With `scaler` (--amp fp16: a torch.amp.GradScaler) the backward pass runs on the loss times the
current loss scale, so the flat gradient holds scale x grad until the method's update unscales it;
the returned loss is never scaled. `label_smoothing` (--label-smoothing) makes every pass's loss the
cross-entropy against smoothed targets, as F.cross_entropy defines it: the objective the method descends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflat.loss.evaluation import at_least_fp32, autocast
from fastflat.flat import FlatParams


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with batch statistics but leaves running stats and counters untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False  # forward then passes no running buffers to F.batch_norm
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class _Tallied:
    """Training loss (summed over examples, fp32) and correct predictions of the first pass over
    each part, on the device: no host sync. SAM's second pass over a part does not count again."""

    def __init__(self, device: torch.device, label_smoothing: float):
        self.label_smoothing = label_smoothing
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self._tallied: set[tuple[int, int]] = set()
        self.example_losses: Tensor | None = None  # (B,) of the last pass called with keep_losses

    def _tally_once(self, span: tuple[int, int], loss: Tensor, logits: Tensor, y: Tensor) -> None:
        if span in self._tallied:
            return
        self._tallied.add(span)
        self.loss_sum += loss * (span[1] - span[0])
        self.correct += (logits.argmax(1) == y).sum()

    # -- per-example losses and a pass over chosen examples (ESAM's data selection) ---------------------
    def losses(self) -> Tensor:
        """Each example's loss at the current weights, (B,) fp32, no gradient; BatchNorm normalises with
        each chunk's statistics and keeps its running ones (like SAM's perturbed pass)."""
        parts = []
        for x, y in self.chunks:
            with torch.no_grad(), frozen_bn_stats(self.model), autocast(x.device, self.amp):
                parts.append(F.cross_entropy(at_least_fp32(self.model(x)), y, reduction="none",
                                             label_smoothing=self.label_smoothing))
        return torch.cat(parts)

    def selected(self, chosen: Tensor, update_bn: bool = False) -> Tensor:
        """Zero the flat gradient, then fill it with the gradient of the mean loss over the examples where
        `chosen` ((B,) bool) is set, chunk by chunk; returns that mean loss (detached). Not tallied."""
        self.flat.zero_grad_()
        total = torch.zeros((), device=chosen.device)
        count = int(chosen.sum())  # one host sync: the chunks' shares of the mean
        start = 0
        for x, y in self.chunks:
            here = chosen[start : start + len(y)]
            start += len(y)
            picked = int(here.sum())
            if picked:
                loss, _, _ = _forward(self.model, x[here], y[here], self.amp, True, update_bn, picked / count, self.scaler,
                                      smoothing=self.label_smoothing)
                total += loss * (picked / count)
        return total


class BatchClosure(_Tallied):
    """Loss on one batch (methods.Closure). `part` restricts a pass to a slice of the batch
    (m-sharpness); update_bn=False keeps BatchNorm running statistics unchanged (SAM's second pass)."""

    def __init__(self, model: nn.Module, flat: FlatParams, x: Tensor, y: Tensor, amp: str = "none",
                 scaler: torch.amp.GradScaler | None = None, label_smoothing: float = 0.0):
        super().__init__(x.device, label_smoothing)
        self.model, self.flat, self.x, self.y, self.amp, self.scaler = model, flat, x, y, amp, scaler
        self.batch_size = x.shape[0]
        self.chunks = [(x, y)]  # the batch as the one chunk of a split: what SplitClosure offers too

    def block(self, part: slice) -> tuple[Tensor, Tensor]:
        """(x, y) of examples part.start:part.stop of the batch."""
        return self.x[part], self.y[part]

    def __call__(self, backward: bool = True, part: slice | None = None, update_bn: bool = True,
                 keep_losses: bool = False) -> Tensor:
        """keep_losses: also keep each example's loss of this pass in `example_losses` ((B,) of the part)."""
        span = (0, self.batch_size) if part is None else (part.start, part.stop)
        x, y = self.x[span[0] : span[1]], self.y[span[0] : span[1]]
        if backward:
            self.flat.zero_grad_()
        loss, logits, self.example_losses = _forward(self.model, x, y, self.amp, backward, update_bn, 1.0, self.scaler,
                                                     keep_losses, self.label_smoothing)
        self._tally_once(span, loss, logits, y)
        return loss


class SplitClosure(_Tallied):
    """Mean loss over a whole split given as chunks [(x, y), ...]; its gradient is the gradient of
    that mean, accumulated chunk by chunk into the flat buffer (zeroed once per call, not per chunk).
    Chunk sizes change speed and memory, never the result beyond float rounding (without BatchNorm;
    with it, each chunk normalises by its own statistics: ghost batches)."""

    def __init__(self, model: nn.Module, flat: FlatParams, chunks: list[tuple[Tensor, Tensor]], amp: str = "none",
                 scaler: torch.amp.GradScaler | None = None, label_smoothing: float = 0.0):
        super().__init__(chunks[0][0].device, label_smoothing)
        self.model, self.flat, self.chunks, self.amp, self.scaler = model, flat, chunks, amp, scaler
        self.batch_size = sum(len(y) for _, y in chunks)

    def __call__(self, backward: bool = True, part: slice | None = None, update_bn: bool = True,
                 keep_losses: bool = False) -> Tensor:
        """The whole split's mean loss, or with `part` (global example indices, inside one chunk) that
        block's mean loss and gradient alone: the gradient-norm penalty per block of b examples.
        keep_losses: also keep each example's loss of this pass in `example_losses`."""
        if part is not None:
            x, y = self.block(part)
            if backward:
                self.flat.zero_grad_()
            loss, logits, self.example_losses = _forward(self.model, x, y, self.amp, backward, update_bn, 1.0,
                                                         self.scaler, keep_losses, self.label_smoothing)
            self._tally_once((part.start, part.stop), loss, logits, y)
            return loss
        if backward:
            self.flat.zero_grad_()
        total = torch.zeros((), device=self.chunks[0][0].device)
        start, kept = 0, []
        for x, y in self.chunks:
            weight = len(y) / self.batch_size  # mean over the split = sum of chunk means x size share
            loss, logits, losses = _forward(self.model, x, y, self.amp, backward, update_bn, weight, self.scaler,
                                            keep_losses, self.label_smoothing)
            self._tally_once((start, start + len(y)), loss, logits, y)
            total += loss * weight
            start += len(y)
            kept.append(losses)
        self.example_losses = torch.cat(kept) if keep_losses else None
        return total

    def block(self, part: slice) -> tuple[Tensor, Tensor]:
        """(x, y) of examples part.start:part.stop, which must lie inside one chunk."""
        start = 0
        for x, y in self.chunks:
            if part.start < start + len(y):
                if part.stop > start + len(y):
                    raise ValueError(f"block {part.start}:{part.stop} crosses a chunk boundary at {start + len(y)}")
                return x[part.start - start : part.stop - start], y[part.start - start : part.stop - start]
            start += len(y)
        raise ValueError(f"block {part.start}:{part.stop} is past the split's {start} examples")


def _forward(model: nn.Module, x: Tensor, y: Tensor, amp: str, backward: bool, update_bn: bool,
             weight: float, scaler: torch.amp.GradScaler | None = None,
             per_example: bool = False, smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Mean cross-entropy of one chunk (detached), its logits and, with per_example, each example's loss
    ((B,), detached; else None); backward adds weight * its gradient (times the loss scale with a
    scaler: a device-side multiply, no host sync)."""
    bn = contextlib.nullcontext() if update_bn else frozen_bn_stats(model)
    losses = None
    with torch.set_grad_enabled(backward), bn, autocast(x.device, amp):
        logits = model(x)  # (B, classes)
        if per_example:
            losses = F.cross_entropy(at_least_fp32(logits), y, reduction="none", label_smoothing=smoothing)
            loss = losses.mean()
        else:
            loss = F.cross_entropy(at_least_fp32(logits), y, label_smoothing=smoothing)
    if backward:
        scaled = loss * weight if weight != 1.0 else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss.detach(), logits.detach(), None if losses is None else losses.detach()
