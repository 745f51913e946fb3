"""Hessian-vector products of the mean cross-entropy over fixed data, by double backward on a flat model.

    hv = hvp(flat, [(x1, y1), (x2, y2)], v)     # v: (N,) per flat group; H v in the same layout

The data come in chunks (any sizes); each chunk's gradient is taken with create_graph, dotted with v and
differentiated again, and the results add up in flat.grads weighted by chunk size: memory holds one
chunk's graph, whatever the data. BatchNorm statistics are frozen, so nothing about the model changes.
One product costs about two backward passes over the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflat.loss.closures import frozen_bn_stats
from fastflat.loss.evaluation import at_least_fp32, autocast
from fastflat.flat import FlatParams


def hvp(flat: FlatParams, chunks: list[tuple[Tensor, Tensor]], v: list[Tensor], amp: str = "none") -> list[Tensor]:
    """H v of the mean loss over all `chunks` at the model's current weights; also left in flat.grads."""
    model = flat.model
    total = sum(len(y) for _, y in chunks)
    params = [model.get_parameter(name) for vec in flat.vectors for name in vec.names]
    pieces = [v_i[off : off + p.numel()].view_as(p)
              for vec, v_i in zip(flat.vectors, v) for off, p in zip(vec.offsets, (model.get_parameter(n) for n in vec.names))]
    flat.zero_grad_()
    with torch.enable_grad(), frozen_bn_stats(model):
        for x, y in chunks:
            with autocast(x.device, amp):
                loss = F.cross_entropy(at_least_fp32(model(x)), y) * (len(y) / total)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            torch.stack([(g * p).sum() for g, p in zip(grads, pieces)]).sum().backward()
    return [g.clone() for g in flat.grads]
