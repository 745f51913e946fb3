"""--sync-bn: BatchNorm whose training statistics cover the global batch of every rank, so a multi-rank
run normalises exactly as one process with the same global batch would.

On CUDA this is torch's SyncBatchNorm. torch's refuses CPU tensors, so on gloo the same arithmetic is
written here: per-channel sums and sums of squares all-reduced with the differentiable
torch.distributed.nn all_reduce (the backward pass reduces the gradients of the statistics too).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

# its replacement in _functional_collectives has no autograd; this one differentiates through the sum
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d over the global batch of a gloo process group (training); eval as usual."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]  # every axis but the channels
        x64 = x.double()  # sums of squares in fp64: E[x^2] - E[x]^2 cancels badly in fp32
        local_count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), local_count])  # (2C + 1,)
        stats = dist_fn.all_reduce(stats)  # differentiable sum over the ranks
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = stats[c : 2 * c] / count - mean * mean  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var * count / (count - 1)  # as torch keeps it
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), factor)
        shape = [1, c] + [1] * (x.dim() - 2)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert(model: nn.Module, cuda: bool) -> nn.Module:
    """Every BatchNorm of `model` made global (torch's SyncBatchNorm on CUDA, GlobalBatchNorm on CPU)."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement.to(next(child.buffers(), torch.zeros(0)).device))
        else:
            convert(child, cuda)
    return model
