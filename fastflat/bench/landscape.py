"""`fastflat bench landscape`: points per second of our grid evaluation against a per-point loop of the
kind the public landscape tools use (set each parameter tensor, re-estimate BatchNorm, evaluate).

    rows = run_landscape("cnn", "fashion-mnist", examples=1000, grid=4, device=torch.device("cpu"))

Every variant scores the same G x G plane (two random unit directions through the initial weights), on
the same seeded example subsets, in the same process; each row carries its points per second, the ratio
to the baseline loop, and the largest difference of its train losses from the loop's (they must agree).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from fastflat import data as datasets
from fastflat.data.models import build_model
from fastflat.geometry.points import PointScorer, WeightSpace
from fastflat.loss.batchnorm import update_bn


def _plane(space: WeightSpace, grid: int, scale: float) -> list[torch.Tensor]:
    w0 = space.get()
    g = torch.Generator().manual_seed(0)
    u, v = (torch.randn(space.numel, generator=g).to(w0.device) for _ in range(2))
    u, v = u / u.norm() * scale, v / v.norm() * scale
    steps = [2 * i / (grid - 1) - 1 for i in range(grid)]
    return [w0 + x * u + y * v for y in steps for x in steps]


def _baseline_loop(scorer: PointScorer, points: list[torch.Tensor]) -> list[float]:
    """The public tools' way: copy every parameter tensor of the point into the model one by one,
    update_bn, then evaluate the train and test subsets in eval mode. Returns the train losses."""
    model = scorer.model
    named = list(scorer.space.layout.items())
    params = dict(model.named_parameters())
    losses = []
    with torch.no_grad():
        for w in points:
            for name, (offset, shape) in named:
                params[name].copy_(w[offset : offset + shape.numel()].view(shape))
            update_bn([(x,) for x, _ in scorer.train_batches], model, exact=True)  # the rule ours uses
            model.eval()
            total = 0.0
            for x, y in scorer.train_batches:
                total += float(F.cross_entropy(model(x), y, reduction="sum"))
            for x, y in scorer.test_batches:
                float(F.cross_entropy(model(x), y, reduction="sum"))
            losses.append(total / len(scorer.train))
    return losses


def _timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_landscape(model_name: str, dataset: str, examples: int, grid: int, device: torch.device,
                  at_once: tuple[int, ...] = (4, 16), scale: float = 5.0) -> list[dict[str, Any]]:
    data = datasets.load_dataset(dataset, device=device)
    torch.manual_seed(0)
    model = build_model(model_name, data.in_channels, data.num_classes, data.image_size).to(device)
    space = WeightSpace(model)
    scorer = PointScorer(space, data, examples, seed=0)
    points = _plane(space, grid, scale)
    scorer.score_one(points[0]), _baseline_loop(scorer, points[:1])  # warm-up: allocator, lazy init
    base_losses, base_s = _timed(lambda: _baseline_loop(scorer, points))
    variants = [("per-parameter loop (public tools' way)", base_losses, base_s)]
    rows, one_s = _timed(lambda: [scorer.score_one(p) for p in points])
    variants.append(("fastflat, one point at a time", [r["train_loss"] for r in rows], one_s))
    for k in at_once:
        scorer.score_batched(torch.stack(points[:k]))  # warm-up at this K
        rows, s = _timed(lambda: [r for i in range(0, len(points), k)
                                  for r in scorer.score_batched(torch.stack(points[i : i + k]))])
        variants.append((f"fastflat, {k} points at once (vmap)", [r["train_loss"] for r in rows], s))
    n = len(points)
    return [{"variant": name, "model": model_name, "dataset": dataset, "examples": examples, "points": n,
             "params": space.numel, "seconds": s, "points_per_s": n / s, "speedup_vs_loop": base_s / s,
             "max_train_loss_diff_vs_loop": max(abs(a - b) for a, b in zip(losses, base_losses))}
            for name, losses, s in variants]
