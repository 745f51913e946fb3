"""`fastflat curve` and `fastflat landscape plane|line|rays`: thin commands over fastflat.geometry.landscape,
registered on the main app (fastflat.cli imports this module after defining it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fastflat.cli.app import app
from fastflat.cli.options import setting_help
from fastflat.cli.consoles import console, err_console
from fastflat.methods.curve import CurveKind
from fastflat.errors import UserError
from fastflat.cli.progress import progress_bar

landscape_app = typer.Typer(help="Loss-surface pictures: the plane through three solutions, a line, random rays.",
                            no_args_is_help=True)
app.add_typer(landscape_app, name="landscape")

Examples = Annotated[int, typer.Option(help="Examples per point: a seeded subset of the training and test sets (0 = all).")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")]
DataDir = Annotated[str | None, typer.Option(help="Folder holding the dataset files.")]
BNUpdate = Annotated[bool, typer.Option("--bn-update/--no-bn-update", help="Re-estimate BatchNorm statistics at every point.")]
AtOnce = Annotated[int, typer.Option(help="Points scored at once with torch.func.vmap (1 = a per-point loop; see fastflat bench landscape).")]
Seed = Annotated[int, typer.Option(help="Seed of the example subsets (and of ray directions).")]


def _write(report: dict[str, Any], out: Path, name: str, plot) -> Path:
    """name.json (strict JSON), name.npz (the grids as arrays) and name.png in `out`, each atomically."""
    import io

    import numpy as np

    from fastflat.runs.rundir import json_safe
    from fastflat.runs.rundir import atomic_write_bytes, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    arrays = {k: np.asarray(v) for k, v in report.items() if k.endswith(("_loss", "_err"))}
    if arrays:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(out / f"{name}.npz", buffer.getvalue())
    plot(report, out / f"{name}.png")
    return out / f"{name}.json"


def _with_provenance(report: dict[str, Any], device: str) -> dict[str, Any]:
    from fastflat.loss.evaluation import resolve_device
    from fastflat.runs.rundir import provenance

    return {**report, "provenance": provenance(resolve_device(device))}


@landscape_app.command("plane")
def plane_command(
    points: Annotated[list[str], typer.Option("--points", help="Three run directories or member files: w1 w2 w3 (repeat --points).")],
    grid: Annotated[int, typer.Option(min=2, help="Points per side of the grid.")] = 21,
    margin: Annotated[float, typer.Option(min=0.0, help="Grid margin around the three points, times their span.")] = 0.2,
    trajectory: Annotated[str | None, typer.Option(help="A run trained with --trajectory-every: project its weights onto the plane.")] = None,
    examples: Examples = 0, seed: Seed = 0, bn_update: BNUpdate = True, points_at_once: AtOnce = 1,
    device: Device = "auto", data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="Folder for plane.json/.npz/.png (and the per-point cache).")] = Path("landscape"),
) -> None:
    """Train loss and test error over the plane through three solutions, P(x, y) = w1 + x u + y v."""
    from fastflat.geometry.landscape import plane
    from fastflat.analysis.plots import plot_plane

    with progress_bar(err_console, "plane") as progress:
        report = plane(points, grid, margin, examples, seed, bn_update, trajectory, points_at_once, device, data_dir,
                       out, progress)
    target = _write(_with_provenance(report, device), out, "plane", plot_plane)
    if "trajectory" in report:
        off = report["trajectory"]["distance_off_plane"]
        console.print(f"trajectory: {len(off)} points, distance off the plane up to {max(off):.3g} (weight units)")
    console.print(f"plane of {grid}x{grid} points: train loss {min(map(min, report['train_loss'])):.4g} .. "
                  f"{max(map(max, report['train_loss'])):.4g}; report: {target} and {target.with_suffix('.png')}")


@landscape_app.command("line")
def line_command(
    a: Annotated[str, typer.Option("--from", help="Point A (t = 1), e.g. RUN/members/swa.pt.")],
    b: Annotated[str, typer.Option("--to", help="Point B (t = 0), e.g. the SWA run's final SGD weights (RUN).")],
    t_range: Annotated[tuple[float, float], typer.Option("--range", help="t from .. to (past both ends).")] = (-0.5, 1.5),
    steps: Annotated[int, typer.Option(min=2, help="Points along the line.")] = 41,
    examples: Examples = 0, seed: Seed = 0, bn_update: BNUpdate = True, points_at_once: AtOnce = 1,
    device: Device = "auto", data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="Folder for line.json/.npz/.png.")] = Path("landscape"),
) -> None:
    """Train and test loss and error along w(t) = t A + (1 - t) B."""
    from fastflat.geometry.landscape import line
    from fastflat.analysis.plots import plot_line

    with progress_bar(err_console, "line") as progress:
        report = line(a, b, t_range, steps, examples, seed, bn_update, points_at_once, device, data_dir, out, progress)
    target = _write(_with_provenance(report, device), out, "line", plot_line)
    console.print(f"line of {steps} points over t in [{t_range[0]}, {t_range[1]}], |A - B| = {report['distance']:.4g}; "
                  f"report: {target} and {target.with_suffix('.png')}")


@landscape_app.command("rays")
def rays_command(
    at: Annotated[list[str], typer.Option("--at", help="Origin(s): run directories or member files (repeat --at).")],
    directions: Annotated[int, typer.Option(help="Random directions per origin (the same ones from every origin).")] = 5,
    distance: Annotated[float, typer.Option(help="Farthest distance along each direction.")] = 30.0,
    steps: Annotated[int, typer.Option(help="Points along each ray, from 0 to --distance.")] = 16,
    filter_norm: Annotated[bool, typer.Option(help="Filter-normalised directions (Li et al. 2018) instead of unit ones.")] = False,
    examples: Examples = 0, seed: Seed = 0, bn_update: BNUpdate = True, points_at_once: AtOnce = 1,
    device: Device = "auto", data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="Folder for rays.json/.png.")] = Path("landscape"),
) -> None:
    """Train and test error against the distance along random directions from each origin."""
    from fastflat.geometry.landscape import rays
    from fastflat.analysis.plots import plot_rays

    with progress_bar(err_console, "rays") as progress:
        report = rays(at, directions, distance, steps, filter_norm, examples, seed, bn_update, points_at_once,
                      device, data_dir, out, progress)
    target = _write(_with_provenance(report, device), out, "rays", plot_rays)
    for ray in report["rays"]:
        far = [row[-1] for row in ray["train_err"]]
        console.print(f"{ray['at']}: train error at distance {distance:g}: {min(far):.2f} .. {max(far):.2f} %")
    console.print(f"report: {target} and {target.with_suffix('.png')}")


@app.command("curve")
def curve_command(
    start: Annotated[str | None, typer.Option(help="End point w1: a run directory or member file.")] = None,
    end: Annotated[str | None, typer.Option(help="End point w2 (same model and dataset).")] = None,
    curve: Annotated[CurveKind, typer.Option(help="Bezier (quadratic) or polygonal chain through the bend.")] = CurveKind("bezier"),
    epochs: Annotated[int, typer.Option(help="Epochs to train the bend.")] = 4,
    lr: Annotated[float | None, typer.Option(help=setting_help("lr"))] = None,
    weight_decay: Annotated[float | None, typer.Option(help=setting_help("weight_decay"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=setting_help("batch_size"))] = None,
    seed: Annotated[int | None, typer.Option(help=setting_help("seed"))] = None,
    points: Annotated[int, typer.Option(help="Values of t evaluated along each path (the paper: 61).")] = 61,
    examples: Examples = 0, bn_update: BNUpdate = True, points_at_once: AtOnce = 1,
    device: Device = "auto", data_dir: DataDir = None,
    out: Annotated[str, typer.Option(help="Parent folder of the curve's run directory.")] = "runs",
    name: Annotated[str | None, typer.Option(help="Run directory name (default: curve-<kind>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Finish an interrupted curve run (training, then the evaluation).")] = None,
) -> None:
    """Train a mode-connecting curve between two solutions, then evaluate it and the straight segment."""
    import datetime as dt

    from fastflat import loop as training
    from fastflat.config import load_config
    from fastflat.geometry.landscape import curve_report
    from fastflat.analysis.plots import plot_curve
    from fastflat.cli.progress import RichHooks
    from fastflat.runs.rundir import load_checkpoint, load_point

    hooks = RichHooks(console)
    if resume is not None:
        if start or end:
            raise UserError("--resume continues the curve run as it was started; drop --start/--end")
        run = resume
        if not (run / "summary.json").exists():
            training.resume(run, hooks)
    else:
        if not start or not end:
            raise UserError("fastflat curve needs both end points: --start RUN_A --end RUN_B")
        a, b = load_point(start)["config"], load_point(end)["config"]
        if (a["model"], a["dataset"]) != (b["model"], b["dataset"]):
            raise UserError(f"--start is a {a['model']} / {a['dataset']} run, --end a {b['model']} / {b['dataset']} "
                            "one: a curve joins two solutions of one architecture and dataset")
        cfg = load_config(None, {"method": "curve", "curve.start": start, "curve.end": end, "curve.kind": curve.value,
                                 "model": a["model"], "dataset": a["dataset"], "data_dir": data_dir or a["data_dir"],
                                 "label_noise": a["label_noise"], "epochs": epochs, "lr": lr, "seed": seed,  # None:
                                 "weight_decay": weight_decay, "batch_size": batch_size,  # the config's default
                                 "device": device, "out": out,
                                 "name": name or f"curve-{curve.value}-{dt.datetime.now():%Y%m%d-%H%M%S}"})
        run = Path(training.train(cfg, hooks)["run_dir"])
    hooks.stop()
    device = load_checkpoint(run)["config"]["device"] if resume is not None else device
    with progress_bar(err_console, f"curve and line, {points} points each") as progress:
        report = curve_report(run, points, examples, 0, bn_update, points_at_once, device, data_dir, run, progress)
    target = _write(_with_provenance(report, device), run, "curve", plot_curve)
    c, s = report["curve"], report["line"]
    console.print(f"train-loss barrier: {report['curve_kind']} curve {c['barrier']:.4g}, straight segment "
                  f"{s['barrier']:.4g}; highest test error on the path: curve {max(c['test_err']):.2f}%, "
                  f"segment {max(s['test_err']):.2f}%")
    console.print(f"report: {target} and {target.with_suffix('.png')}; the bend: {run / 'members' / 'bend.pt'}")
