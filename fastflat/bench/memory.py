"""Peak memory of the fused ES reduction against the number of children K: it must not grow with K.

    rows = es_peak_memory([8, 512], n=2**20, device)

w <- w + alpha sum_k c_k eps_k regenerates every eps_k from (seed, k), so the extra memory is O(N)
whatever K (a K x N noise matrix would be K * N * 4 bytes). On CUDA the peak comes from torch's
allocator statistics; on a CPU, where torch keeps none, each K runs in a fresh process and the peak
resident set growth over the op is read back (coarser: page-level, includes allocator caching).
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

_CPU_PROBE = """
import json, resource, sys, torch
from fastflat.ops import noise
n, k = int(sys.argv[1]), int(sys.argv[2])
w = torch.zeros(n)
members, coeffs = torch.arange(k), torch.ones(k)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
noise.weighted_noise_sum_(w, 1, members, coeffs, 1e-3)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_extra_bytes": max(after - before, 0) * 1024}))
"""


def _cuda_peak(n: int, k: int, device: torch.device) -> int:
    from fastflat.ops import noise

    w = torch.zeros(n, device=device)
    members = torch.arange(k, device=device)
    coeffs = torch.ones(k, device=device)
    noise.weighted_noise_sum_(w, 0, members[:1], coeffs[:1], 1e-3)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    noise.weighted_noise_sum_(w, 1, members, coeffs, 1e-3)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _cpu_peak(n: int, k: int) -> int:
    proc = subprocess.run([sys.executable, "-c", _CPU_PROBE, str(n), str(k)], capture_output=True, text=True,
                          check=True, timeout=1800)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def es_peak_memory(children: list[int], n: int, device: torch.device) -> list[dict]:
    """One row per K: the peak extra bytes of one weighted_noise_sum_ over n fp32 weights."""
    rows = []
    for k in children:
        peak = _cuda_peak(n, k, device) if device.type == "cuda" else _cpu_peak(n, k)
        rows.append({"op": "es-update", "size": n, "children": k, "peak_extra_bytes": peak,
                     "peak_extra_per_param": peak / n, "stored_noise_bytes": k * n * 4,
                     "method": "cuda allocator peak" if device.type == "cuda" else "process peak RSS growth"})
    return rows
