"""`fastflat sharpness` and `fastflat toy`: thin commands over fastflat.analysis.sharpness and fastflat.analysis.toy,
registered on the main app (fastflat.cli imports this module after defining it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fastflat.cli.app import app
from fastflat.cli.consoles import console, err_console
from fastflat.cli.outputs import OUT_DEFAULT, Name, Out, results_dir
from fastflat.errors import UserError


@app.command("sharpness")
def sharpness_command(
    checkpoints: Annotated[list[Path], typer.Argument(help="Run directories or checkpoint files, compared side by side.")],
    examples: Annotated[int, typer.Option(min=1, help="First N training examples (no augmentation; full: 4096).")] = 1024,
    top: Annotated[int, typer.Option(help="Top-K Hessian eigenvalues (Lanczos).")] = 1,
    trace_probes: Annotated[int, typer.Option(help="Rademacher probes for the Hutchinson trace (0 = skip; full: 64).")] = 16,
    m: Annotated[str, typer.Option(help="Batch sizes m for SAM's m-sharpness, e.g. 8,32,128 (empty = skip).")] = "",
    rho: Annotated[float, typer.Option(help="Radius of the sharpness ball.")] = 0.05,
    ball: Annotated[str, typer.Option(help="Balls for m-sharpness: l2, linf or l2,linf.")] = "l2",
    adaptive: Annotated[bool, typer.Option(help="Scale the ball by |w| (adaptive sharpness).")] = False,
    density: Annotated[int, typer.Option(help="SLQ probes for the spectral density, drawn to density.png (0 = skip).")] = 0,
    tol: Annotated[float, typer.Option(help="Lanczos tolerance on each Ritz value's relative residual.")] = 1e-3,
    lanczos_steps: Annotated[int, typer.Option(help="Most Lanczos steps (Hessian-vector products) for the top "
                                               "eigenvalues; memory holds twice as many weight vectors.")] = 50,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset files.")] = None,
    out: Out = OUT_DEFAULT, name: Name = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of a table.")] = False,
) -> None:
    """Sharpness of trained weights: top Hessian eigenvalues, Hessian trace, SAM's m-sharpness."""
    from fastflat.loss.evaluation import resolve_device
    from fastflat.runs.rundir import json_safe
    from fastflat.runs.rundir import atomic_write_text, provenance
    from fastflat.analysis.sharpness import measure_checkpoint

    ms, balls = _sharpness_settings(checkpoints, examples, top, trace_probes, m, rho, ball, density, tol, lanczos_steps)
    from fastflat.cli.progress import staged_progress

    with staged_progress(err_console) as progress:
        results = [measure_checkpoint(str(c), examples, top, trace_probes, ms, rho, balls, adaptive, tol, lanczos_steps,
                                      device=device, data_dir=data_dir, density=density, progress=progress)
                   for c in checkpoints]
    report = {"checkpoints": results, "provenance": provenance(resolve_device(device))}
    out = results_dir(out, name, "sharpness")
    atomic_write_text(out / "sharpness.json", json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    if density:
        from fastflat.analysis.plots import plot_spectral_density

        plot_spectral_density(results, out / "density.png")
    if as_json:
        print(json.dumps(json_safe(report)))
        return
    from rich.table import Table

    table = Table(title=f"sharpness on {examples} training examples ({results[0]['mode']})")
    for column in ("checkpoint", "top eigenvalues", "HVPs", "trace (± s.e.)", *sorted(results[0].get("sharpness", {}))):
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for r in results:
        trace = f"{r['trace']:.4g} ± {r['trace_stderr']:.2g}" if "trace" in r else "-"
        hvps = str(r["hvps"]) + (f" + {r['start_hvps']} on {r['start_examples']}" if r["start_hvps"] else "")
        table.add_row(r["checkpoint"], ", ".join(f"{v:.4g}" for v in r["top_eigenvalues"]), hvps, trace,
                      *(f"{v:.4g}" for _, v in sorted(r.get("sharpness", {}).items())))
    console.print(table)
    console.print(f"report: {out / 'sharpness.json'}")


def _sharpness_settings(checkpoints: list[Path], examples: int, top: int, trace_probes: int, m: str, rho: float,
                        ball: str, density: int, tol: float, steps: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Every option checked, and every checkpoint read (finite, one model and dataset), before any measure:
    all problems in one UserError. Returns the m values and the balls."""
    import math

    from fastflat.config import config_from_dict
    from fastflat.load import check_same_model_and_data
    from fastflat.runs.rundir import load_point

    problems, ms = [], ()
    try:
        ms = tuple(int(v) for v in m.split(",") if v.strip())
    except ValueError:
        problems.append(f"--m {m!r}: give comma-separated counts, e.g. 8,32,128")
    balls = tuple(b.strip() for b in ball.split(","))
    checks = [(all(b in ("l2", "linf") for b in balls), f"--ball {ball!r}: l2, linf or l2,linf"),
              (all(1 <= v <= examples for v in ms), f"--m {m!r}: each m from 1 to --examples ({examples})"),
              (math.isfinite(rho) and rho > 0, f"--rho {rho}: a finite radius > 0"),
              (steps >= 1, f"--lanczos-steps {steps}: at least 1"),
              (1 <= top <= max(steps, 1), f"--top {top}: 1 to {steps} (Lanczos finds at most as many eigenvalues "
                                          "as its --lanczos-steps)"),
              (trace_probes == 0 or trace_probes >= 2, f"--trace-probes {trace_probes}: 0 (skip) or at least 2 (the "
                                                       "trace's standard error needs two)"),
              (density == 0 or density >= 2, f"--density {density}: 0 (skip) or at least 2 probes"),
              (math.isfinite(tol) and 0 < tol < 1, f"--tol {tol}: a relative residual in (0, 1)")]
    problems += [problem for ok, problem in checks if not ok]
    if problems:
        raise UserError("; ".join(problems))
    states = [load_point(c) for c in checkpoints]  # unreadable or non-finite: named here (exit 2 or 3)
    check_same_model_and_data(list(checkpoints), [config_from_dict(s["config"]) for s in states])
    _lanczos_fits(states[0]["model"], steps)
    return ms, balls


def _lanczos_fits(state_dict: dict, steps: int) -> None:
    """Lanczos keeps its basis of up to `steps` + 1 weight vectors, stacked once more to orthogonalise:
    about 2 (steps + 1) N fp32 values. Refused when that alone passes half this machine's memory."""
    import os

    n = sum(v.numel() for v in state_dict.values() if v.is_floating_point())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = 2 * (steps + 1) * n * 4
    if need > memory // 2:
        fits = memory // 2 // (8 * n) - 1
        size = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"  # noqa: E731
        raise UserError(f"--lanczos-steps {steps} over {n:,} values (weights and buffers) needs about {size(need)} for "
                        f"Lanczos' basis, more than half of this machine's {size(memory)}; use --lanczos-steps "
                        f"{max(fits, 1)} or fewer" + ("" if fits >= 1 else " (too few: measure on a larger machine)"))


@app.command("toy")
def toy_command(
    fn: Annotated[str, typer.Option("--fn", help="easom | eggholder | rastrigin | rosenbrock.")] = "easom",
    optimizer: Annotated[str, typer.Option(help="sgd | adagrad | adam (torch's), with and without SAM.")] = "sgd",
    rho: Annotated[float, typer.Option(help="SAM's ascent radius.")] = 0.3,
    starts: Annotated[int, typer.Option(help="Seeded random start points, shared by both optimizers.")] = 4,
    steps: Annotated[int, typer.Option(help="Steps per trajectory.")] = 300,
    lr: Annotated[float | None, typer.Option(help="Step size (default: one that suits the function).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the start points.")] = 0,
    out: Out = OUT_DEFAULT, name: Name = None,
) -> None:
    """2-D test functions: trajectories with and without SAM from the same starts, on a contour plot."""
    from fastflat.runs.rundir import json_safe
    from fastflat.runs.rundir import atomic_write_text
    from fastflat.analysis.toy import plot_toy, run_toy

    report = run_toy(fn, optimizer, starts, rho, steps, lr, seed)
    target = results_dir(out, name, f"toy-{fn}-{optimizer}") / "toy.json"
    atomic_write_text(target, json.dumps(json_safe(report), allow_nan=False) + "\n")
    plot_toy(report, target.with_suffix(".png"))
    from rich.table import Table

    table = Table(title=f"{fn} (global minimum {report['minimum']} at {tuple(round(v, 4) for v in report['argmin'])})")
    for column in ("start", "optimizer", "end", "value", "global minimum"):
        table.add_column(column, justify="right")
    for run in report["runs"]:
        name = f"SAM({optimizer})" if run["kind"] == "sam" else optimizer
        table.add_row(f"({run['start'][0]:.3g}, {run['start'][1]:.3g})", name,
                      f"({run['end'][0]:.4g}, {run['end'][1]:.4g})", f"{run['value']:.4g}", "yes" if run["global_min"] else "no")
    console.print(table)
    console.print(f"report: {target} and {target.with_suffix('.png')}")


@app.command("report")
def report_command(
    folders: Annotated[list[Path], typer.Argument(help="Run directories and results directories (ensemble, sharpness, "
                                                       "landscape, curve, toy), shown in this order.")],
    title: Annotated[str | None, typer.Option(help="The page's title (default: the folders' names).")] = None,
    out: Out = OUT_DEFAULT, name: Name = None,
) -> None:
    """One self-contained HTML page (figures inlined) of runs and results: a study on one page."""
    from fastflat.analysis.report import build_report
    from fastflat.runs.rundir import atomic_write_text

    page = build_report(folders, title)
    target = results_dir(out, name, "report") / "report.html"
    atomic_write_text(target, page)
    console.print(f"report: {target} ({len(page) / 2**20:.1f} MiB, open it in any browser)")
