"""Flat parameters: every trainable parameter of a model as a view into one contiguous buffer.

    flat = fastflat.flatten(model)      # or FlatParams(model)
    flat.vectors[0].param, flat.vectors[0].grad   # (N,) buffers; p.data / p.grad are views of them

After flattening, an op over "all parameters" is one kernel launch over one vector per (device, dtype),
whatever the model. This module is the only code that creates, re-points or checks those views.
Rules (tested in tests/test_flat.py): zero grads in place (`zero_grad_`), never `set_to_none`; update
params in place, never `p.data = other`; flatten again after `model.to(...)`.

`FlatParams(model, channels_last=True)` lays each 4-D (conv) weight out as (O, kh, kw, I) in the buffer, so
its view has channels_last strides and the CPU's convolutions and max-pools run in NHWC (1.8x faster for
the small CNN on 2 cores). Code that reads a buffer by parameter uses `FlatParams.shaped` or
`param_view`, which follow each parameter's own strides, never `.view(shape)` of a slice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class FlatVector:
    """One (device, dtype) group: a parameter buffer, its gradient buffer, and where each param lives."""

    param: Tensor  # (N,) leaf tensor; `param.grad` is `grad`, so torch.optim can step it as one tensor
    grad: Tensor  # (N,) same device and dtype
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # start of each named param in the buffer

    @property
    def numel(self) -> int:
        return self.param.numel()


class FlatParams:
    """Copies a model's trainable parameters into flat buffers and re-points them as views.

    Frozen parameters (requires_grad=False) are left alone. Each group keeps the order of
    `model.named_parameters()`, so offsets are the same on every run and device.
    """

    def __init__(self, model: nn.Module, channels_last: bool = False):
        self.model = model
        self.channels_last = channels_last
        groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, nn.Parameter]]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault((p.device, p.dtype), []).append((name, p))
        if not groups:
            raise ValueError("model has no trainable parameters to flatten")
        self.vectors = [self._flatten_group(members, channels_last) for members in groups.values()]
        self._params = [p for members in groups.values() for _, p in members]
        self._expected_ptrs = [p.data_ptr() for p in self._params]
        for p in self._params:
            p._fastflat_buffer = self  # lets drop-ins find these views and check them (see __deepcopy__)

    @staticmethod
    def _flatten_group(members: list[tuple[str, nn.Parameter]], channels_last: bool) -> FlatVector:
        first = members[0][1]
        total = sum(p.numel() for _, p in members)
        param_buf = torch.empty(total, dtype=first.dtype, device=first.device)
        grad_buf = torch.zeros(total, dtype=first.dtype, device=first.device)
        vector = FlatVector(param_buf, grad_buf)
        offset = 0
        for name, p in members:
            n = p.numel()
            shape_in_buffer = _buffer_layout(p, channels_last)
            weights = _as_param(param_buf[offset : offset + n], p, shape_in_buffer)
            weights.copy_(p.detach())
            # Re-point, do not copy: the module keeps its Parameter objects (hooks, optimizers that
            # were built already, named_parameters) and only their storage moves into the buffer.
            p.data = weights
            p.grad = _as_param(grad_buf[offset : offset + n], p, shape_in_buffer)
            vector.names.append(name)
            vector.offsets.append(offset)
            offset += n
        param_buf.grad = grad_buf
        return vector

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of a flattened parameter (AveragedModel copies the model) is not flattened:
        its `_fastflat_buffer` becomes None instead of a copy of every buffer."""
        return None

    # -- the flat views ------------------------------------------------------------------------------
    @property
    def params(self) -> list[Tensor]:
        """One (N,) parameter vector per (device, dtype) group."""
        return [v.param for v in self.vectors]

    @property
    def grads(self) -> list[Tensor]:
        return [v.grad for v in self.vectors]

    @property
    def numel(self) -> int:
        return sum(v.numel for v in self.vectors)

    def shaped(self, vectors: list[Tensor]) -> list[Tensor]:
        """Per parameter (in `named_parameters` order within each group), a view of the matching (N,)
        vector of `vectors` (laid out like the buffers: a direction, an H v) with the parameter's shape and
        strides: what `v[offset:offset + n].view_as(p)` would be if every layout were contiguous."""
        return [param_view(v, offset, self.model.get_parameter(name))
                for vec, v in zip(self.vectors, vectors) for name, offset in zip(vec.names, vec.offsets)]

    def zero_grad_(self) -> None:
        """Zero every gradient in place (set_to_none would detach the views from the buffer)."""
        for v in self.vectors:
            v.grad.zero_()

    def decay_masks(self) -> list[Tensor]:
        """(N,) per vector, in its dtype: 1 where a weight of 2+ dimensions lives, 0 on 1-D parameters
        (normalization scales and shifts, biases): what timm exempts from weight decay."""
        masks = []
        for vec in self.vectors:
            mask = torch.zeros_like(vec.param, requires_grad=False)
            for name, start in zip(vec.names, vec.offsets):
                p = self.model.get_parameter(name)
                if p.ndim >= 2:
                    mask[start : start + p.numel()] = 1
            masks.append(mask)
        return masks

    def clone_params(self) -> list[Tensor]:
        """A detached copy of the current weights, one tensor per group (snapshots, averages)."""
        return [v.param.detach().clone() for v in self.vectors]

    def copy_params_(self, source: list[Tensor]) -> None:
        for v, s in zip(self.vectors, source):
            v.param.copy_(s)

    # -- checks --------------------------------------------------------------------------------------
    def views_intact(self) -> bool:
        """False if some parameter no longer points into the buffer (`model.to`, `p.data = ...`)."""
        if any(p.data_ptr() != ptr for p, ptr in zip(self._params, self._expected_ptrs)):
            return False
        grad_ptrs = [
            v.grad.data_ptr() + off * v.grad.element_size() for v in self.vectors for off in v.offsets
        ]
        return all(p.grad is not None and p.grad.data_ptr() == ptr for p, ptr in zip(self._params, grad_ptrs))

    def check_views(self) -> None:
        if not self.views_intact():
            raise RuntimeError(
                "a parameter or gradient no longer points into the flat buffer: after model.to(...), "
                "zero_grad(set_to_none=True) or p.data = ..., call fastflat.flatten(model) again"
            )


def _buffer_layout(p: Tensor, channels_last: bool) -> tuple[int, ...]:
    """The order `p`'s elements take in the buffer: its own shape, or (O, kh, kw, I) for a 4-D weight
    laid out channels_last."""
    if channels_last and p.dim() == 4:
        out_ch, in_ch, kh, kw = p.shape
        return (out_ch, kh, kw, in_ch)
    return tuple(p.shape)


def _as_param(segment: Tensor, p: Tensor, shape_in_buffer: tuple[int, ...]) -> Tensor:
    """A view of the (n,) buffer `segment` with p's shape, its elements in `shape_in_buffer` order."""
    laid = segment.view(shape_in_buffer)
    return laid.permute(0, 3, 1, 2) if tuple(shape_in_buffer) != tuple(p.shape) else laid


def param_view(vector: Tensor, offset: int, p: Tensor) -> Tensor:
    """The piece of `vector` ((..., N): leading dims batch several vectors) that holds parameter `p`, at
    `offset` in a buffer laid out like p's: shape (..., *p.shape), p's strides (channels_last or not)."""
    if vector.stride(-1) != 1:
        raise ValueError("param_view needs vectors whose elements are adjacent (last stride 1)")
    strides = (*vector.stride()[:-1], *p.stride())
    return vector.as_strided((*vector.shape[:-1], *p.shape), strides, vector.storage_offset() + offset)


def check_flattened_views(params: Iterable[Tensor]) -> None:
    """Raise (check_views' message) if any of `params` was flattened and has left its buffer since:
    torch's default zero_grad(set_to_none=True), model.to(dtype), or p.data = ... do that silently."""
    seen: set[int] = set()
    for p in params:
        flat = getattr(p, "_fastflat_buffer", None)
        if flat is not None and id(flat) not in seen:
            seen.add(id(flat))
            flat.check_views()


def flatten(model: nn.Module, channels_last: bool = False) -> FlatParams:
    """Flatten `model`'s trainable parameters in place and return the handle to the buffers (4-D weights in
    channels_last order if asked)."""
    return FlatParams(model, channels_last)


def contiguous_cover(tensors: list[Tensor]) -> Tensor | None:
    """A 1-D view covering `tensors` if they tile one storage back to back, else None.

    This is how the drop-ins (fastflat.SAM, clip_grad_norm_) find the one-launch path for any
    parameter list that happens to live in a flat buffer, ours or anyone's, without a registry.
    """
    if not tensors:
        return None
    first = tensors[0]
    storage_ptr = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in tensors:
        same_place = (
            t.untyped_storage().data_ptr() == storage_ptr
            and t.dtype == first.dtype
            and t.device == first.device
        )
        dense = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
        if not same_place or t.storage_offset() != offset or not dense:
            return None
        offset += t.numel()
    start = first.storage_offset()
    return first.new_empty(0).set_(first.untyped_storage(), start, (offset - start,), (1,))


def paired_covers(params: list[Tensor], grads: list[Tensor]) -> list[tuple[Tensor, Tensor]] | None:
    """Split aligned (param, grad) lists into runs that each tile one storage; cover every run.

    Returns one (param_vector, grad_vector) pair per run, or None when any run is not back to back
    (then callers take their foreach path). A flattened model gives one pair per (device, dtype).
    """
    runs: list[tuple[list[Tensor], list[Tensor]]] = []
    last_storages = None
    for p, g in zip(params, grads):
        storages = (p.untyped_storage().data_ptr(), g.untyped_storage().data_ptr())
        if storages != last_storages:
            runs.append(([], []))
            last_storages = storages
        runs[-1][0].append(p)
        runs[-1][1].append(g)
    covers = []
    for run_params, run_grads in runs:
        p_cover, g_cover = contiguous_cover(run_params), contiguous_cover(run_grads)
        if p_cover is None or g_cover is None:
            return None
        covers.append((p_cover, g_cover))
    return covers
