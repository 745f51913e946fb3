"""Triton kernels and their launchers. Imports torch and triton only, nothing of fastflat.

Every kernel is the same 1-D shape: program `pid` owns `offsets = pid * BLOCK + arange(BLOCK)`,
masked by `offsets < n`; math is done in fp32 whatever the storage dtype. `fastflat.ops` (and
`fastflat.ops.noise` for the ES noise) holds the pure-torch twin of each launcher and decides which one runs.
"""

from fastflat.ops.kernels.average import average_
from fastflat.ops.kernels.clip import clip_scale_
from fastflat.ops.kernels.combine import combine3_
from fastflat.ops.kernels.noise import perturb_into_, philox_words, weighted_noise_sum_
from fastflat.ops.kernels.norm import sqnorm
from fastflat.ops.kernels.sam import sam_perturb_
from fastflat.ops.kernels.sam_family import axpby_, dot, fsam_direction_

__all__ = [
    "average_", "axpby_", "clip_scale_", "combine3_", "dot", "fsam_direction_", "perturb_into_", "philox_words",
    "sam_perturb_", "sqnorm", "weighted_noise_sum_",
]
