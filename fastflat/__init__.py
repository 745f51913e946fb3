"""fastflat: train toward flat minima and build cheap ensembles, with fused Triton kernels.

    flat = fastflat.flatten(model)                                   # one buffer, params as views
    opt = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    fastflat.clip_grad_norm_(model.parameters(), 1.0)
"""

from fastflat.flat import FlatParams, flatten
from fastflat.noise import member_noise
from fastflat.optim import SAM, AveragedModel, clip_grad_norm_

__version__ = "0.1.0"
__all__ = ["SAM", "AveragedModel", "FlatParams", "clip_grad_norm_", "flatten", "member_noise"]
