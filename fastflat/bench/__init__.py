"""Benchmarks of the fused ops and of whole training steps, behind `fastflat bench kernels|train`.

    from fastflat.bench.registry import OPS        # the ops benchmarked; a new op is one entry there
    rows = fastflat.bench.kernels.run_kernels(settings)

Results are rows of plain values (times in ms, bandwidth in GB/s) with provenance; see benchmarks/README.md.
"""
