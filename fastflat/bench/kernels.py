"""`fastflat bench kernels`: every op of the registry, every provider, side by side, on each workload.

    rows = run_kernels(KernelSettings(ops=["sam"], workloads=[size_workload("2^20")], dtypes=["bf16"]))

Per workload and dtype: time `dst.copy_(src)` over the same elements (the bandwidth to compare with),
run the flat-torch reference once, then for each provider check its result against the reference and
time it only if it agrees. GPU: triton.testing.do_bench (L2 flushed between calls); CPU:
torch.utils.benchmark's blocked_autorange. Times are the median and interquartile range, in ms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastflat.bench.registry import BASELINES, OPS, PROVIDERS, REFERENCE, Impl
from fastflat.bench.workloads import DTYPES, Buffers, Workload

# Largest result error allowed, relative to the largest reference value: a few units in the last place
# of the dtype (the loop provider rounds e, norms and sums in the storage dtype; the twin in fp32).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 5e-3}

ROW_FIELDS = ("op", "provider", "workload", "numel", "tensors", "dtype", "status", "reason", "max_rel_err",
              "time_ms", "iqr_ms", "floor_bytes", "gbps", "copy_gbps", "pct_copy",
              *(f"vs_{b}" for b in BASELINES))


@dataclass
class KernelSettings:
    ops: list[str]
    workloads: list[Workload]
    dtypes: list[str]
    providers: list[str] = field(default_factory=lambda: list(PROVIDERS))
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    quick: bool = False  # shorter timing; no torch.compile on CPU


def time_call(fn: Callable[[], Any], device: torch.device, quick: bool) -> tuple[float, float]:
    """(median, interquartile range) of one call of `fn`, in ms, after warm-up."""
    if device.type == "cuda" and _triton_importable():
        from triton.testing import do_bench

        warmup_ms, repeat_ms = (5, 20) if quick else (25, 200)
        q25, q50, q75 = do_bench(fn, warmup=warmup_ms, rep=repeat_ms, quantiles=[0.25, 0.5, 0.75])
        return q50, q75 - q25
    from torch.utils import benchmark  # synchronises CUDA itself when triton is missing

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measured = timer.blocked_autorange(min_run_time=0.01 if quick else 0.5)
    return measured.median * 1e3, measured.iqr * 1e3


def _triton_importable() -> bool:
    from fastflat.ops import triton_available

    return triton_available()


def _as_vector(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _trace(impl: Impl) -> list[Tensor]:
    """Run one call step by step; the (M,) fp32 result after each step."""
    out = []
    for step in impl.steps:
        step()
        out.append(_as_vector(impl.result()))
    return out


def max_rel_err(got: list[Tensor], want: list[Tensor]) -> float:
    """max |got - want| over every step, relative to the largest |want|; nan if steps or shapes differ."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("nan")
    errs = [(g - w).abs().max() / w.abs().max().clamp(min=1e-30) for g, w in zip(got, want)]
    return torch.stack(errs).max().item()  # nan propagates: a non-finite result never passes


def _not_run_reason(provider: str, settings: KernelSettings) -> tuple[str, str] | None:
    """(status, reason) when the provider is not even built on this device and settings."""
    if provider == "triton" and settings.device.type != "cuda":
        return "n/a", "Triton kernels are timed on CUDA only (the CPU interpreter is a test tool)"
    if provider == "triton" and not _triton_importable():
        return "n/a", "triton does not import"
    if provider == "compile" and settings.quick and settings.device.type == "cpu":
        return "skipped", "torch.compile is not run on CPU with --quick"
    return None


def _reference(op_name: str, bufs: Buffers) -> list[Tensor] | str:
    """The flat-torch result after each step, or why it could not be computed (out of memory, say)."""
    try:
        return _trace(OPS[op_name].build(REFERENCE, bufs))
    except Exception as e:
        return f"no {REFERENCE} reference to check against: {_one_line(e)}"


def _measure(provider: str, op_name: str, bufs: Buffers, reference: list[Tensor] | str,
             settings: KernelSettings) -> dict[str, Any]:
    """Build, check and (if correct) time one provider; returns the row's status, error and times."""
    skip = _not_run_reason(provider, settings)
    if skip is not None:
        return {"status": skip[0], "reason": skip[1]}
    if isinstance(reference, str):
        return {"status": "error", "reason": reference}
    try:
        impl = OPS[op_name].build(provider, bufs)
        err = max_rel_err(_trace(impl), reference)
    except LookupError as e:
        return {"status": "n/a", "reason": str(e)}
    except Exception as e:  # a compile failure, or out of memory: record it, keep benchmarking
        return {"status": "skipped" if provider == "compile" else "error", "reason": _one_line(e)}
    if not err <= TOLERANCE[bufs.dtype]:
        return {"status": "invalid", "reason": f"result differs from {REFERENCE} (max rel err {err:.3g})",
                "max_rel_err": err}
    time_ms, iqr_ms = time_call(impl, settings.device, settings.quick)
    return {"status": "ok", "max_rel_err": err, "time_ms": time_ms, "iqr_ms": iqr_ms}


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def _row(**values: Any) -> dict[str, Any]:
    return {**dict.fromkeys(ROW_FIELDS), **values}


def _add_rates(rows: list[dict[str, Any]], copy_gbps: float) -> None:
    """GB/s at the byte floor, share of copy bandwidth, speed-up over each baseline (same op, same run)."""
    times = {r["provider"]: r["time_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["gbps"] = r["floor_bytes"] / (r["time_ms"] * 1e-3) / 1e9
        r["copy_gbps"] = copy_gbps
        r["pct_copy"] = 100.0 * r["gbps"] / copy_gbps
        for b in BASELINES:
            r[f"vs_{b}"] = times[b] / r["time_ms"] if b in times else None


def _copy_row(bufs: Buffers, settings: KernelSettings, common: dict[str, Any]) -> dict[str, Any]:
    src = bufs.base("w")
    dst = torch.empty_like(src)
    time_ms, iqr_ms = time_call(lambda: dst.copy_(src), settings.device, settings.quick)
    floor = 2 * src.numel() * src.element_size()  # read src, write dst
    gbps = floor / (time_ms * 1e-3) / 1e9
    return _row(**common, op="copy", provider="torch", tensors=1, status="ok", time_ms=time_ms, iqr_ms=iqr_ms,
                floor_bytes=floor, gbps=gbps, copy_gbps=gbps, pct_copy=100.0)


def _bench_workload(workload: Workload, dtype_name: str, settings: KernelSettings) -> list[dict[str, Any]]:
    bufs = Buffers(workload, DTYPES[dtype_name], settings.device)
    common = {"workload": workload.label, "numel": workload.numel, "dtype": dtype_name}
    copy = _copy_row(bufs, settings, common)
    rows = [copy]
    for op_name in settings.ops:
        op, reference = OPS[op_name], _reference(op_name, bufs)
        op_rows = []
        for provider in settings.providers:
            flat = provider in ("compile", "flat-torch", "triton")
            op_rows.append(_row(**common, op=op_name, provider=provider,
                                tensors=1 if flat else len(workload.shapes),
                                floor_bytes=op.floor * workload.numel * bufs.dtype.itemsize,
                                **_measure(provider, op_name, bufs, reference, settings)))
        _add_rates(op_rows, copy["gbps"])
        rows += op_rows
        del reference
    return rows


def run_kernels(settings: KernelSettings, on_workload: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every (workload, dtype, op, provider) of `settings` as one row of ROW_FIELDS."""
    rows = []
    for workload in settings.workloads:
        for dtype_name in settings.dtypes:
            if on_workload is not None:
                on_workload(f"{workload.label} ({workload.numel:,} params in {len(workload.shapes)} tensors), "
                            f"{dtype_name}")
            rows += _bench_workload(workload, dtype_name, settings)
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
