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
    pieces = flat.shaped(v)
    flat.zero_grad_()
    with torch.enable_grad(), frozen_bn_stats(model):
        for x, y in chunks:
            with autocast(x.device, amp):
                loss = F.cross_entropy(at_least_fp32(model(x)), y) * (len(y) / total)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            torch.stack([(g * p).sum() for g, p in zip(grads, pieces)]).sum().backward()
    return [g.clone() for g in flat.grads]


class KeptGraphs:
    """H v with each chunk's gradient graph built once and kept: a product is then one backward through
    the kept graphs, with no forward pass (PyHessian's way when its data fit one batch). Memory holds
    every chunk's graph at once; `graph_bytes` measures one chunk's before choosing this.

        hv = KeptGraphs(flat, chunks)([v])          # the same H v as hvp(flat, chunks, [v])
    """

    def __init__(self, flat: FlatParams, chunks: list[tuple[Tensor, Tensor]], amp: str = "none"):
        self.flat = flat
        model = flat.model
        total = sum(len(y) for _, y in chunks)
        self.params = [model.get_parameter(name) for vec in flat.vectors for name in vec.names]
        self.grads = []  # per chunk: the gradient of its share of the mean loss, with its graph
        with torch.enable_grad(), frozen_bn_stats(model):
            for x, y in chunks:
                with autocast(x.device, amp):
                    loss = F.cross_entropy(at_least_fp32(model(x)), y) * (len(y) / total)
                self.grads.append(torch.autograd.grad(loss, self.params, create_graph=True))

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        flat = self.flat
        pieces = flat.shaped(v)
        flat.zero_grad_()
        with torch.enable_grad():
            for grads in self.grads:
                torch.stack([(g * p).sum() for g, p in zip(grads, pieces)]).sum().backward(retain_graph=True)
        return [g.clone() for g in flat.grads]


def graph_bytes(flat: FlatParams, chunk: tuple[Tensor, Tensor], amp: str = "none") -> int:
    """Bytes that one chunk's kept gradient graph holds: every tensor autograd saves while building it
    (an overestimate where saved tensors share storage, e.g. the weights themselves)."""
    saved = [0]

    def pack(t: Tensor) -> Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        KeptGraphs(flat, [chunk], amp)
    return saved[0]
