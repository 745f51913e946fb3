"""BatchNorm statistics recomputed for a model's current weights: `fastflat.update_bn`.

    update_bn(loader, model)                                   # torch.optim.swa_utils.update_bn, as it is
    update_bn(loader, model, call_fn=lambda m, b: m(**b))      # any batch: dicts, several inputs, ...
    update_bn(loader, model, exact=True)                       # statistics exact over the examples

torch's update_bn (and so the default here) sets momentum to None, a cumulative average over batches:
each batch weighs the same, so a short last batch counts as much as a full one (a 512 + 488 split of
1,000 examples moves the running mean by ~1e-3 from the examples' mean). It also takes only `input[0]`
of a batch. `call_fn(model, batch)` runs the forward pass your way (pytorch issue #49082), and
`exact=True` accumulates per channel the count, sum and sum of squares of every BatchNorm input (fp64),
then sets running_mean to the mean over all examples and running_var to their unbiased variance, which
is what one batch of the whole set would give. fastflat's own recomputations (SWA, EMA) use exact=True.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None,
              call_fn: Callable[[nn.Module, Any], Any] | None = None, exact: bool = False) -> None:
    """Recompute every BatchNorm's running statistics over `loader`, leaving the model's mode and the
    modules' momenta as they were. Without call_fn a batch is a tensor or a list/tuple whose first item
    is the input (moved to `device` when given), as in torch."""
    modules = [m for m in model.modules() if isinstance(m, BatchNorm) and m.track_running_stats]
    if not modules:
        return
    momenta = {m: m.momentum for m in modules}
    sums: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = []
    for m in modules:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, as torch
        if exact:
            hooks.append(m.register_forward_pre_hook(_accumulating(sums)))
    was_training = model.training
    model.train()
    try:
        for batch in loader:
            if call_fn is not None:
                call_fn(model, batch)
                continue
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device) if device is not None else x)
    finally:
        for hook in hooks:
            hook.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    for m, (count, total, squares) in sums.items():
        mean, variance = statistics_from_sums(float(count), total, squares)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(variance.to(m.running_var.dtype))


def statistics_from_sums(count: float, total: torch.Tensor, squares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance, as BatchNorm keeps it) per channel from the count of values per channel,
    their sum and their sum of squares (fp64, any leading axes)."""
    mean = total / count
    return mean, (squares / count - mean**2).clamp_min(0) * (count / max(count - 1, 1))


def _accumulating(sums: dict[nn.Module, list[torch.Tensor]]):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().double()
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * spatial)
        count = torch.tensor(float(per_channel.shape[1]), dtype=torch.float64, device=x.device)
        found = sums.setdefault(module, [torch.zeros((), dtype=torch.float64, device=x.device),
                                         torch.zeros(x.shape[1], dtype=torch.float64, device=x.device),
                                         torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)])
        found[0] += count
        found[1] += per_channel.sum(1)
        found[2] += (per_channel**2).sum(1)
    return hook
