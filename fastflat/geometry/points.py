"""Evaluate many weight vectors of one model: curves, planes, lines and rays all reduce to this.

    space = WeightSpace(model)                        # one (N,) vector <-> the model's parameters
    scorer = PointScorer(space, data, examples=2048)  # seeded train/test subsets, BatchNorm re-estimated
    row = scorer.score_one(vector)                    # (N,) -> a dict of train/test loss and error
    rows = scorer.score_batched(torch.stack(vectors)) # (K, N) -> K dicts, K points in one vmapped call

A point's BatchNorm statistics are re-estimated on the training subset before it is scored, because
weights off the training trajectory have no statistics of their own: the mean and unbiased variance of
every BatchNorm input over all the subset's examples (fastflat.update_bn(exact=True); torch's update_bn
averages per batch instead, so a short last batch would weigh as much as a full one). Two ways to score K points, equal to
float tolerance (tested): a per-point loop, and `points_at_once` points in one vmapped
functional_call (the stacked weights and BatchNorm buffers get a leading K axis; what wins depends
on the model and device: `fastflat bench landscape` measures it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fastflat import data as datasets
from fastflat.loss.batchnorm import statistics_from_sums, update_bn
from fastflat.loss.evaluation import at_least_fp32
from fastflat.flat import FlatParams


class WeightSpace:
    """The model's trainable parameters as one (N,) vector (every flat group, concatenated)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flat = FlatParams(model)
        self.numel = self.flat.numel
        # name -> (offset in the vector, shape), in the vector's order
        self.layout: dict[str, tuple[int, torch.Size]] = {}
        shapes = dict(model.named_parameters())
        base = 0
        for group in self.flat.vectors:
            for name, offset in zip(group.names, group.offsets):
                self.layout[name] = (base + offset, shapes[name].shape)
            base += group.numel

    def get(self) -> Tensor:
        """A copy of the current weights, (N,)."""
        return torch.cat([p.detach().reshape(-1) for p in self.flat.params]).clone()

    def set_(self, vector: Tensor) -> None:
        """Copy an (N,) vector into the model's parameters."""
        start = 0
        for p in self.flat.params:
            p.data.copy_(vector[start : start + p.numel()])
            start += p.numel()

    def vector_of(self, state_dict: dict[str, Tensor], load: Callable[[nn.Module, dict], None]) -> Tensor:
        """The (N,) vector of a state_dict (loaded with `load`, which names the source on a mismatch)."""
        load(self.model, state_dict)
        return self.get()

    def unstack(self, stacked: Tensor) -> dict[str, Tensor]:
        """(K, N) -> {name: (K, *shape)} views, for a vmapped functional_call."""
        k = stacked.shape[0]
        return {name: stacked[:, off : off + shape.numel()].view(k, *shape) for name, (off, shape) in self.layout.items()}


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class PointScorer:
    """Train loss/error and test loss/error (%) of weight vectors on fixed, seeded example subsets.

    `examples` caps both subsets (0 = whole splits). `reference_probs` (n_test, C): also report the test
    error of the two-model ensemble {reference, point} (a curve's {w1, phi(t)}).
    """

    def __init__(self, space: WeightSpace, data: datasets.Dataset, examples: int = 0, seed: int = 0,
                 bn_update: bool = True, batch_size: int = 512, reference_probs: Tensor | None = None):
        self.space, self.model, self.data = space, space.model, data
        self.train = datasets.random_subset(data.train, examples, seed) if examples else data.train
        self.test = datasets.random_subset(data.test, examples, seed) if examples and examples < len(data.test) else data.test
        self.train_batches = list(datasets.iterate_batches(self.train, batch_size, dataset=data, train=False))
        self.test_batches = list(datasets.iterate_batches(self.test, batch_size, dataset=data, train=False))
        self.bn_update = bn_update and has_batchnorm(self.model)
        self.reference_probs = reference_probs

    # -- one point at a time ---------------------------------------------------------------------------
    def _load(self, vector: Tensor) -> None:
        """Put the point in the model, re-estimate BatchNorm on the train subset, switch to eval."""
        self.space.set_(vector)
        if self.bn_update:
            update_bn([(x,) for x, _ in self.train_batches], self.model, exact=True)
        self.model.eval()

    @torch.no_grad()
    def score_one(self, vector: Tensor) -> dict[str, float]:
        self._load(vector)
        train = _metrics([self.model(x) for x, _ in self.train_batches], self.train_batches)
        test_logits = [self.model(x) for x, _ in self.test_batches]
        return {**_named(train, "train"), **_named(_metrics(test_logits, self.test_batches), "test"),
                **self._ensemble(torch.cat(test_logits)[None])[0]}

    @torch.no_grad()
    def test_probs(self, vector: Tensor) -> Tensor:
        """(n_test, C) softmax of one point, BatchNorm as score_one sets it (an ensemble's member or
        reference): one pass over the test subset, none over the train subset beyond BatchNorm's."""
        self._load(vector)
        return torch.cat([at_least_fp32(self.model(x)).softmax(1) for x, _ in self.test_batches])

    # -- several points in one vmapped pass ------------------------------------------------------------
    @torch.no_grad()
    def score_batched(self, stacked: Tensor) -> list[dict[str, float]]:
        """(K, N) points; BatchNorm buffers get a K axis, num_batches_tracked stays shared (one count)."""
        params = self.space.unstack(stacked)
        k = stacked.shape[0]
        buffers, dims = {}, {}
        for name, b in self.model.named_buffers():
            if name.endswith("num_batches_tracked"):
                buffers[name], dims[name] = torch.zeros_like(b), None
            else:
                buffers[name], dims[name] = b.detach().unsqueeze(0).repeat(k, *([1] * b.dim())).contiguous(), 0
        run = vmap(lambda p, b, x: functional_call(self.model, (p, b), (x,)), in_dims=(0, dims, None))
        if self.bn_update:
            self._exact_statistics(params, buffers, dims)
        self.model.eval()
        train = [run(params, buffers, x) for x, _ in self.train_batches]  # each (K, B, C)
        test = [run(params, buffers, x) for x, _ in self.test_batches]
        rows = []
        ensemble = self._ensemble(torch.cat(test, 1))
        for i in range(k):
            rows.append({**_named(_metrics([t[i] for t in train], self.train_batches), "train"),
                         **_named(_metrics([t[i] for t in test], self.test_batches), "test"), **ensemble[i]})
        return rows

    def _exact_statistics(self, params: dict[str, Tensor], buffers: dict[str, Tensor], dims: dict[str, Any]) -> None:
        """Each point's BatchNorm statistics, as update_bn(exact=True) sets them one point at a time: per
        channel the count, sum and sum of squares of every BatchNorm input over the train subset (fp64),
        gathered by hooks inside the vmapped forward (train mode) and returned with a K axis."""
        modules = {name: m for name, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        seen: list[tuple[Tensor, Tensor]] = []  # one forward's (sum, sum of squares) per BatchNorm, in order
        counts: list[float] = []  # values per channel per BatchNorm in that forward (the same for every point)

        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].double()
            over = [d for d in range(x.dim()) if d != 1]  # every axis but the channel's
            seen.append((x.sum(over), (x * x).sum(over)))
            counts.append(x.numel() / x.shape[1])

        def forward(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> list[tuple[Tensor, Tensor]]:
            seen.clear()
            counts.clear()
            functional_call(self.model, (p, b), (x,))
            return list(seen)

        handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
        self.model.train()
        totals: list[list[Any]] = [[0.0, 0.0, 0.0] for _ in modules]  # per BatchNorm: count, (K, C) sums, squares
        try:
            for x, _ in self.train_batches:
                found = vmap(forward, in_dims=(0, dims, None))(params, buffers, x)
                for total, (sums, squares), count in zip(totals, found, counts):
                    total[0] += count
                    total[1] = total[1] + sums
                    total[2] = total[2] + squares
        finally:
            for handle in handles:
                handle.remove()
        for name, (count, sums, squares) in zip(modules, totals):
            mean, variance = statistics_from_sums(count, sums, squares)  # (K, C) each
            prefix = f"{name}." if name else ""
            buffers[prefix + "running_mean"].copy_(mean.to(buffers[prefix + "running_mean"].dtype))
            buffers[prefix + "running_var"].copy_(variance.to(buffers[prefix + "running_var"].dtype))

    def _ensemble(self, test_logits: Tensor) -> list[dict[str, float]]:
        """(K, n_test, C) logits -> per point {ensemble_err} with the reference, or {} without one."""
        if self.reference_probs is None:
            return [{} for _ in range(test_logits.shape[0])]
        labels = torch.cat([y for _, y in self.test_batches])
        probs = (at_least_fp32(test_logits).softmax(-1) + self.reference_probs) / 2
        errors = 100.0 * (probs.argmax(-1) != labels).float().mean(-1)
        return [{"ensemble_err": float(e)} for e in errors]


def _metrics(logits: list[Tensor], batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    loss, correct, n = 0.0, 0, 0
    for z, (_, y) in zip(logits, batches):
        z = at_least_fp32(z)
        loss += float(F.cross_entropy(z, y, reduction="sum"))
        correct += int((z.argmax(1) == y).sum())
        n += len(y)
    return {"loss": loss / n, "err": 100.0 * (1 - correct / n)}


def _named(metrics: dict[str, float], split: str) -> dict[str, Any]:
    return {f"{split}_{k}": v for k, v in metrics.items()}
