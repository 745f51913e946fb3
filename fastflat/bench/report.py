"""Benchmark rows out: a Rich table on the terminal, and JSON + CSV files that are never overwritten.

    paths = write_results("benchmarks/results", "kernels", device, rows, settings)
    # -> benchmarks/results/kernels-<device kind>-<UTC time>.json and .csv

Every row carries the provenance of the run (fastflat.runs.rundir.provenance: git SHA, torch and triton
versions, device name, timestamp), so a file read on its own says what produced it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sys
import platform
import re
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fastflat.errors import UserError
from fastflat.runs.rundir import device_name, provenance


def device_kind(device: torch.device) -> str:
    """A file-name-safe device name: 'nvidia-h100-80gb-hbm3', 'cpu-x86_64'."""
    name = device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-")


def with_provenance(rows: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Each row followed by the same provenance fields (one timestamp for the whole run)."""
    info = {"device_kind": device_kind(device), **provenance(device)}
    return [{**row, **info} for row in rows]


def _free_stem(out_dir: Path, benchmark: str, kind: str, stamp: str) -> Path:
    stem, suffix = out_dir / f"{benchmark}-{kind}-{stamp}", 1
    while stem.with_suffix(".json").exists() or stem.with_suffix(".csv").exists():
        suffix += 1
        stem = out_dir / f"{benchmark}-{kind}-{stamp}-{suffix}"
    return stem


def write_results(out_dir: str | Path, benchmark: str, device: torch.device, rows: list[dict[str, Any]],
                  settings: dict[str, Any], stamp: str | None = None) -> tuple[Path, Path]:
    """Write rows (already with provenance) as JSON and CSV; existing files are never touched."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create results folder {out_dir}: {e.strerror}") from None
    stamp = stamp or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = _free_stem(out_dir, benchmark, device_kind(device), stamp)
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    document = {"benchmark": benchmark, "settings": settings, "rows": rows}
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    with open(json_path, "x") as f:  # "x": fail rather than overwrite, should another run race us
        f.write(json.dumps(document, indent=1) + "\n")
    with open(csv_path, "x", newline="") as f:
        f.write(text.getvalue())
    return json_path, csv_path


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


STATUS_STYLE = {"ok": "green", "invalid": "bold red", "error": "red", "skipped": "yellow"}


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        style = STATUS_STYLE.get(row["status"], "dim")
        return f"[{style}]{row['status']}[/{style}]"
    return f"{row['time_ms']:.3g}"


def kernel_table(rows: list[dict[str, Any]]) -> Table:
    """A line per (op, workload, dtype) with the providers side by side, in ms; then how many times faster
    ours is than each baseline that ran. The share of copy bandwidth stays in the JSON and CSV rows."""
    from fastflat.bench.registry import BASELINES, PROVIDERS

    providers = [p for p in PROVIDERS if any(r["provider"] == p and r["status"] == "ok" for r in rows)]
    baselines = [b for b in BASELINES if any(r.get(f"vs_{b}") is not None for r in rows)]
    table = Table(title="fastflat bench kernels: milliseconds per call (median; lower is better)",
                  caption="ours = the Triton kernel where it ran, else the flat-buffer torch twin; "
                          "\"x faster than B\" = B's time / ours")
    for name in ("op", "size", "dtype", *providers, *(f"x faster than {b}" for b in baselines)):
        table.add_column(name, justify="left" if name in ("op", "size", "dtype") else "right")
    cases: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        cases.setdefault((r["op"], r["workload"], r["dtype"]), {})[r["provider"]] = r
    for (op, workload, dtype), by in cases.items():
        if op == "copy":
            continue
        ours = by.get("triton") if by.get("triton", {}).get("status") == "ok" else by.get("flat-torch")
        ratios = [_num(ours and ours[f"vs_{b}"], ".2f") for b in baselines]
        table.add_row(op, workload, dtype, *(_cell(by.get(p)) for p in providers), *ratios)
    return table


def print_notes(console: Console, rows: list[dict[str, Any]]) -> None:
    """Why rows were not timed, once per distinct reason."""
    notes: dict[tuple[str, str, str], None] = {}
    for r in rows:
        if r.get("reason"):
            notes.setdefault((r["provider"], r["status"], r["reason"]), None)
    for provider, status, reason in notes:
        console.print(f"[dim]{provider} {status}: {reason}[/dim]", highlight=False)


def train_table(rows: list[dict[str, Any]]) -> Table:
    processes = rows[0].get("processes", 1) if rows else 1
    table = Table(title=f"fastflat bench train (step: median ms, IQR, the SAM family rows the mean; {processes} process{'es' if processes > 1 else ''})")
    for name in ("method", "model", "status", "step ms", "IQR", "steps/s", "samples/s", "fwd+bwd ms",
                 "passes", "outside fwd+bwd ms", "x SGD time", "round ms", "note"):
        table.add_column(name, justify="left" if name in ("method", "model", "status", "note") else "right")
    for r in rows:
        style = STATUS_STYLE.get(r["status"], "dim")
        table.add_row(r["method"], r["model"], f"[{style}]{r['status']}[/{style}]", _num(r["step_ms"], ".4g"),
                      _num(r["iqr_ms"], ".2g"), _num(r["steps_per_s"], ".2f"), _num(r["samples_per_s"], ".0f"),
                      _num(r["fwd_bwd_ms"], ".4g"), _num(r["passes_per_step"], "g"),
                      _num(r["outside_fwd_bwd_ms"], ".3g"), _num(r["ratio_to_sgd"], ".2f"),
                      _num(r.get("round_ms"), ".4g"), r["reason"] or "")
    return table


NOISY_IQR = 0.25  # IQR / median above this: the timings spread too much to compare
MAX_PCT_COPY = 110.0  # an op that reads and writes at least its byte floor cannot beat a plain copy by more
MIN_COPY_GBPS = 1.0  # a copy slower than this on any machine of this decade means the machine was busy


NOISE_KINDS = {  # what a warning means, said once above the cases it covers
    "spread": "the timings spread widely (IQR over half the median): the machine was busy",
    "too fast": "faster than copying the bytes it must touch: timed under load, served from cache, or the op "
                "skipped its write (clip below its limit); compare at a larger size",
    "slow copy": "the reference copy ran implausibly slowly: the machine was busy",
    "negative": "the passes were timed slower than the whole step (negative time outside fwd+bwd), i.e. noise",
}


def noise_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """Why measurements cannot be trusted: one line per kind of doubt, naming the cases it covers (seen
    under load: pct_copy 2525.7, outside fwd+bwd -94.77 ms). Each row also gets its own in its "warnings"
    field, for the JSON and CSV."""
    cases: dict[str, list[str]] = {}
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        found: list[tuple[str, str]] = []
        median = r.get("time_ms", r.get("step_ms"))
        if median and r.get("iqr_ms") is not None and r["iqr_ms"] / median > NOISY_IQR:
            found.append(("spread", f"IQR {r['iqr_ms']:.3g} ms, {100 * r['iqr_ms'] / median:.0f}% of the median"))
        if r.get("pct_copy") is not None and r["pct_copy"] > MAX_PCT_COPY:
            found.append(("too fast", f"{r['pct_copy']:.0f}% of copy bandwidth"))
        if r.get("op") == "copy" and r.get("gbps") is not None and r["gbps"] < MIN_COPY_GBPS:
            found.append(("slow copy", f"copy bandwidth {r['gbps']:.2f} GB/s"))
        if r.get("outside_fwd_bwd_ms") is not None and r["outside_fwd_bwd_ms"] < 0:
            found.append(("negative", f"{r['outside_fwd_bwd_ms']:.3g} ms outside fwd+bwd"))
        r["warnings"] = "; ".join(f"{detail}: {NOISE_KINDS[kind]}" for kind, detail in found)
        what = " ".join(str(r[k]) for k in ("op", "method", "workload", "model", "dtype", "provider") if r.get(k))
        for kind, detail in found:
            cases.setdefault(kind, []).append(f"{what} ({detail})")
    return [f"{NOISE_KINDS[kind]}: {', '.join(found)}" for kind, found in cases.items()]


def print_rows(rows: list[dict[str, Any]], fmt: str) -> None:
    """--format csv|json: every field of every row, numbers unrounded, on stdout."""
    if fmt == "json":
        print(json.dumps(rows))
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)


def print_provenance(console: Console, rows: list[dict[str, Any]]) -> None:
    if rows:
        r = rows[0]
        console.print(f"[dim]{r['device']} | torch {r['torch']} | triton {r['triton']} | "
                      f"git {r['git_sha']} | {r['timestamp']}[/dim]")
