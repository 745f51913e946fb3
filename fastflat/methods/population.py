"""Score many weight vectors ("children") of one model on fixed batches, without K copies of the model.

    loss, acc = population_scores(flat, write_child, count=K, batches=[(x, y), ...], chunk=8)

`write_child(i, out)` writes child i's (N,) weights into `out`; children are built `chunk` at a time into
a (chunk, N) block and run together through torch.func.functional_call + vmap, so memory holds
`chunk` weight vectors (plus their activations) whatever K is. chunk=1, a model vmap cannot batch, or
several dtype groups fall back to loading each child into the model in turn. BatchNorm runs in eval
mode (the parent's running statistics): scoring never changes the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from fastflat.ops import dist
from fastflat.loss.evaluation import at_least_fp32
from fastflat.flat import FlatParams, param_view

WriteChild = Callable[[int, Tensor], None]


def population_scores(flat: FlatParams, write_child: WriteChild, count: int,
                      batches: list[tuple[Tensor, Tensor]], chunk: int) -> tuple[Tensor, Tensor]:
    """(count,) mean cross-entropy and (count,) accuracy (%) of each child over all `batches`.

    Under torchrun the children are split over the ranks in whole chunks (rank r scores its share of
    the chunks, each exactly as one process would build and run it), and only the (count,) scores are
    exchanged: every rank ends with the same, bitwise, vectors."""
    if not dist.active():
        return _local_scores(flat, write_child, count, batches, chunk)
    chunks = -(-count // max(chunk, 1))
    first = chunks * dist.rank() // dist.world_size() * max(chunk, 1)
    last = min(count, chunks * (dist.rank() + 1) // dist.world_size() * max(chunk, 1))
    device = flat.params[0].device
    loss, acc = torch.zeros(count, device=device), torch.zeros(count, device=device)
    if last > first:
        mine = _local_scores(flat, lambda i, out: write_child(first + i, out), last - first, batches, chunk)
        loss[first:last], acc[first:last] = mine
    both = torch.cat([loss, acc])
    torch.distributed.all_reduce(both)  # each child's scores come from one rank, zeros elsewhere: a gather
    return both[:count], both[count:]


def _local_scores(flat: FlatParams, write_child: WriteChild, count: int,
                  batches: list[tuple[Tensor, Tensor]], chunk: int) -> tuple[Tensor, Tensor]:
    model = flat.model
    was_training = model.training
    model.eval()
    try:
        batched = chunk > 1 and len(flat.vectors) == 1
        if batched:
            try:
                return _scores_vmap(flat, write_child, count, batches, chunk)
            except RuntimeError:
                pass  # an op vmap cannot batch: score one child at a time instead
        return _scores_sequential(flat, write_child, count, batches)
    finally:
        model.train(was_training)


@torch.no_grad()
def _scores_vmap(flat, write_child, count, batches, chunk):
    model, vec = flat.model, flat.vectors[0]
    buffers = dict(model.named_buffers())
    device = vec.param.device
    loss_sum = torch.zeros(count, device=device)
    correct = torch.zeros(count, device=device)
    block = torch.empty(min(chunk, count), vec.numel, dtype=vec.param.dtype, device=device)  # (C, N)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        for j in range(size):
            write_child(start + j, block[j])
        params = {name: param_view(block[:size], off, model.get_parameter(name))  # (size, *shape), p's strides
                  for name, off in zip(vec.names, vec.offsets)}

        def forward(p, x):
            return functional_call(model, (p, buffers), (x,))

        for x, y in batches:
            logits = at_least_fp32(vmap(forward, in_dims=(0, None))(params, x))  # (C, B, classes)
            loss_sum[start : start + size] += F.cross_entropy(
                logits.flatten(0, 1), y.repeat(size), reduction="none").view(size, -1).sum(1)
            correct[start : start + size] += (logits.argmax(2) == y).sum(1)
    total = sum(len(y) for _, y in batches)
    return loss_sum / total, 100.0 * correct / total


@torch.no_grad()
def _scores_sequential(flat, write_child, count, batches):
    parent = flat.clone_params()
    device = parent[0].device
    loss_sum = torch.zeros(count, device=device)
    correct = torch.zeros(count, device=device)
    try:
        for i in range(count):
            write_child(i, flat.params[0])  # one group: the child goes straight into the model
            for x, y in batches:
                logits = at_least_fp32(flat.model(x))
                loss_sum[i] += F.cross_entropy(logits, y, reduction="sum")
                correct[i] += (logits.argmax(1) == y).sum()
    finally:
        flat.copy_params_(parent)
    total = sum(len(y) for _, y in batches)
    return loss_sum / total, 100.0 * correct / total
