"""`fastflat curve` and `fastflat landscape plane|line|rays`: thin commands over fastflat.geometry.landscape,
registered on the main app (fastflat.cli imports this module after defining it)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from fastflat.cli.app import app
from fastflat.cli.options import setting_help
from fastflat.cli.consoles import console, err_console
from fastflat.cli.launch import interrupted_message
from fastflat.methods.curve import CurveKind
from fastflat.errors import UserError
from fastflat.cli.outputs import OUT_DEFAULT, Name, Out, points_cache, results_dir
from fastflat.cli.progress import progress_bar

landscape_app = typer.Typer(help="Loss-surface pictures: the plane through three solutions, a line, random rays.",
                            no_args_is_help=True)
app.add_typer(landscape_app, name="landscape")

EXAMPLES_DEFAULT = 1000  # a CPU scores ~1,000 examples a point in well under a second on the small CNN
Examples = Annotated[int, typer.Option(help="Examples per point: a seeded subset of the training and test sets, the same at "
                                            "every point (0 = all: full pictures).")]
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


@contextmanager
def _interrupted_says(message: Callable[[KeyboardInterrupt], str]):
    """Ctrl-C inside: one line saying what was kept and how to continue, then exit 130."""
    try:
        yield
    except KeyboardInterrupt as e:
        err_console.print(message(e), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _cached_in(out: Path) -> Callable[[KeyboardInterrupt], str]:
    return lambda e: (f"interrupted: the points scored so far are cached in {points_cache(out)}; the same command "
                      "continues from them")


POINT_BYTES = 2048  # host memory per scored point: its row of scores as Python objects, its cache line, the grids


def _refuse_unless(checks: list[tuple[bool, str]]) -> None:
    """Every failed check in one UserError line, before any weights are read."""
    problems = [problem for ok, problem in checks if not ok]
    if problems:
        raise UserError("; ".join(problems))


def _common_checks(examples: int, points_at_once: int) -> list[tuple[bool, str]]:
    return [(examples >= 0, f"--examples {examples}: 0 (every example) or a count"),
            (points_at_once >= 1, f"--points-at-once {points_at_once}: at least 1")]


def _fits_in_memory(points: int, what: str, fix: Callable[[int], str]) -> tuple[bool, str]:
    """A grid whose scores alone would not fit in half this machine's memory is refused with a size that
    fits: fix(most points) says which."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    most = memory // 2 // POINT_BYTES
    return points <= most, (f"{what}: {points:,} points need about {points * POINT_BYTES / 2**30:.1f} GiB for their "
                            f"scores, more than half of this machine's {memory / 2**30:.0f} GiB; use {fix(most)}")


def _with_provenance(report: dict[str, Any], device: str) -> dict[str, Any]:
    from fastflat.loss.evaluation import resolve_device
    from fastflat.runs.rundir import provenance

    return {**report, "provenance": provenance(resolve_device(device))}


@landscape_app.command("plane")
def plane_command(
    at: Annotated[list[str], typer.Option("--at", help="Three solutions, run directories or member files: w1 w2 w3 (repeat --at).")],
    grid: Annotated[int, typer.Option(min=2, help="Points per side of the grid (grid x grid points; full pictures: 21).")] = 11,
    margin: Annotated[float, typer.Option(min=0.0, help="Grid margin around the three points, times their span.")] = 0.2,
    trajectory: Annotated[str | None, typer.Option(help="A run trained with --trajectory-every: project its weights onto the plane.")] = None,
    examples: Examples = EXAMPLES_DEFAULT, seed: Seed = 0, bn_update: BNUpdate = True, points_at_once: AtOnce = 1,
    device: Device = "auto", data_dir: DataDir = None, out: Out = OUT_DEFAULT, name: Name = None,
) -> None:
    """Train loss and test error over the plane through three solutions, P(x, y) = w1 + x u + y v."""
    from fastflat.geometry.landscape import plane
    from fastflat.analysis.plots import plot_plane

    _refuse_unless([(math.isfinite(margin), f"--margin {margin}: a finite share of the points' span"),
                    _fits_in_memory(grid * grid, f"--grid {grid}", lambda most: f"--grid {math.isqrt(most)} or less"),
                    *_common_checks(examples, points_at_once)])

    with _interrupted_says(_cached_in(out)), progress_bar(err_console, f"plane, {grid * grid} points") as progress:
        report = plane(at, grid, margin, examples, seed, bn_update, trajectory, points_at_once, device, data_dir,
                       points_cache(out), progress, warn=_warn)
    target = _write(_with_provenance(report, device), results_dir(out, name, "plane"), "plane", plot_plane)
    if "trajectory" in report:
        off = report["trajectory"]["distance_off_plane"]
        console.print(f"trajectory: {len(off)} points, distance off the plane up to {max(off):.3g} (weight units)")
    console.print(f"plane of {grid}x{grid} points: train loss {min(map(min, report['train_loss'])):.4g} .. "
                  f"{max(map(max, report['train_loss'])):.4g}; report: {target} and {target.with_suffix('.png')}")


@landscape_app.command("line")
def line_command(
    a: Annotated[str, typer.Option("--from", help="Point A (t = 0), e.g. the SWA run's final SGD weights (RUN).")],
    b: Annotated[str, typer.Option("--to", help="Point B (t = 1), e.g. RUN/members/swa.pt.")],
    t_range: Annotated[tuple[float, float], typer.Option("--range", help="t from .. to (past both ends).")] = (-0.5, 1.5),
    points: Annotated[int, typer.Option(min=2, help="Points along the line (full pictures: 41).")] = 21,
    examples: Examples = EXAMPLES_DEFAULT, seed: Seed = 0, bn_update: BNUpdate = True, points_at_once: AtOnce = 1,
    device: Device = "auto", data_dir: DataDir = None, out: Out = OUT_DEFAULT, name: Name = None,
) -> None:
    """Train and test loss and error along w(t) = (1 - t) A + t B."""
    from fastflat.geometry.landscape import line
    from fastflat.analysis.plots import plot_line

    _refuse_unless([(all(map(math.isfinite, t_range)) and t_range[0] < t_range[1],
                     f"--range {t_range[0]} {t_range[1]}: two finite values, the first below the second"),
                    _fits_in_memory(points, f"--points {points}", lambda most: f"--points {most} or less"),
                    *_common_checks(examples, points_at_once)])

    with _interrupted_says(_cached_in(out)), progress_bar(err_console, f"line, {points} points") as progress:
        report = line(a, b, t_range, points, examples, seed, bn_update, points_at_once, device, data_dir,
                      points_cache(out), progress)
    target = _write(_with_provenance(report, device), results_dir(out, name, "line"), "line", plot_line)
    console.print(f"line of {points} points over t in [{t_range[0]}, {t_range[1]}], |A - B| = {report['distance']:.4g}; "
                  f"report: {target} and {target.with_suffix('.png')}")


@landscape_app.command("rays")
def rays_command(
    at: Annotated[list[str], typer.Option("--at", help="Origin(s): run directories or member files (repeat --at).")],
    directions: Annotated[int, typer.Option(help="Random directions per origin (the same ones from every origin).")] = 5,
    distance: Annotated[float, typer.Option(help="Farthest distance along each direction.")] = 30.0,
    points: Annotated[int, typer.Option(help="Points along each ray, from 0 to --distance (full pictures: 16).")] = 8,
    filter_norm: Annotated[bool, typer.Option(help="Filter-normalised directions (Li et al. 2018) instead of unit ones.")] = False,
    examples: Examples = EXAMPLES_DEFAULT, seed: Seed = 0, bn_update: BNUpdate = True, points_at_once: AtOnce = 1,
    device: Device = "auto", data_dir: DataDir = None, out: Out = OUT_DEFAULT, name: Name = None,
) -> None:
    """Train and test error against the distance along random directions from each origin."""
    from fastflat.geometry.landscape import rays
    from fastflat.analysis.plots import plot_rays

    _refuse_unless([(directions >= 1, f"--directions {directions}: at least 1"),
                    (math.isfinite(distance) and distance > 0, f"--distance {distance}: a finite distance > 0"),
                    (points >= 2, f"--points {points}: at least 2 (0 and --distance)"),
                    _fits_in_memory(len(at) * directions * max(points, 0), "--at x --directions x --points",
                                    lambda most: f"at most {most:,} points in all"),
                    *_common_checks(examples, points_at_once)])

    with _interrupted_says(_cached_in(out)), progress_bar(err_console, f"rays, {len(at) * directions * points} points") as progress:
        report = rays(at, directions, distance, points, filter_norm, examples, seed, bn_update, points_at_once,
                      device, data_dir, points_cache(out), progress)
    target = _write(_with_provenance(report, device), results_dir(out, name, "rays"), "rays", plot_rays)
    for ray in report["rays"]:
        far = [row[-1] for row in ray["train_err"]]
        console.print(f"{ray['at']}: train error at distance {distance:g}: {min(far):.2f} .. {max(far):.2f} %")
    console.print(f"report: {target} and {target.with_suffix('.png')}")


CURVE_SETTINGS = "curve-settings.json"  # the evaluation settings a curve run was started with, for --resume


CURVE_DEFAULTS = {"points": 21, "examples": EXAMPLES_DEFAULT}  # quick on a CPU; the paper's pictures: 61 and 0 (all)


@app.command("curve")
def curve_command(
    start: Annotated[str | None, typer.Option("--from", "--start", help="End point w1 (t = 0): a run directory or member file.")] = None,
    end: Annotated[str | None, typer.Option("--to", "--end", help="End point w2 (t = 1), same model and dataset.")] = None,
    curve: Annotated[CurveKind, typer.Option(help="Bezier (quadratic) or polygonal chain through the bend.")] = CurveKind("bezier"),
    epochs: Annotated[int, typer.Option(min=1, help="Epochs to train the bend (full pictures: 4 or more).")] = 1,
    subset: Annotated[int | None, typer.Option(help="Train the bend on a seeded N training examples (default: the "
                                               "end runs' own --subset, so bend and ends see the same data).")] = None,
    max_steps: Annotated[int, typer.Option(help=setting_help("max_steps"))] = 0,
    lr: Annotated[float | None, typer.Option(help=setting_help("lr"))] = None,
    weight_decay: Annotated[float | None, typer.Option(help=setting_help("weight_decay"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=setting_help("batch_size"))] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the bend's run (default: the end runs' seed).")] = None,
    points: Annotated[int | None, typer.Option(help=f"Values of t evaluated along each path (the paper: 61). "
                                               f"[default: {CURVE_DEFAULTS['points']}]")] = None,
    examples: Annotated[int | None, typer.Option(help="Examples per point: a seeded subset of the training and test sets "
                                                 f"(0 = all). [default: {CURVE_DEFAULTS['examples']}]")] = None,
    bn_update: BNUpdate = True, points_at_once: AtOnce = 1,
    device: Device = "auto", data_dir: DataDir = None, out: Out = OUT_DEFAULT,
    name: Annotated[str | None, typer.Option(help="Run directory name (default: curve-<kind>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Finish an interrupted curve run (training, then the evaluation) "
                                                "with the settings it was started with.")] = None,
) -> None:
    """Train a mode-connecting curve between two solutions, then evaluate it and the straight segment."""
    from fastflat import loop as training
    from fastflat.analysis.plots import plot_curve
    from fastflat.cli.progress import RichHooks
    from fastflat.geometry.landscape import curve_report

    if resume is not None:
        if start or end or points is not None or examples is not None:
            raise UserError("--resume continues the curve run with the settings it was started with; drop "
                            "--from/--to/--points/--examples")
        run, settings = resume, _resumable_curve(resume)
        device = settings["device"]
    else:
        settings = {"points": CURVE_DEFAULTS["points"] if points is None else points,
                    "examples": CURVE_DEFAULTS["examples"] if examples is None else examples, "bn_update": bn_update,
                    "points_at_once": points_at_once, "device": device}
        cfg = _new_curve_config(start, end, curve, epochs, lr, weight_decay, batch_size, seed, subset, max_steps,
                                settings, data_dir, out, name)
    hooks = RichHooks(console)
    with _interrupted_says(lambda e: interrupted_message(e, hooks.run_dir, "fastflat curve")):
        try:
            if resume is None:
                run = Path(training.train(cfg, _SavingCurveSettings(hooks, settings))["run_dir"])
            elif not (run / "summary.json").exists():
                training.resume(run, hooks)
        finally:
            hooks.stop()
    with _interrupted_says(lambda e: f"interrupted: the bend is trained; the points scored so far are cached in {run}; "
                                     f"continue with: fastflat curve --resume {run}"):
        with progress_bar(err_console, f"curve and line, {settings['points']} points each") as progress:
            report = curve_report(run, settings["points"], settings["examples"], 0, settings["bn_update"],
                                  settings["points_at_once"], device, data_dir, run, progress)
    target = _write(_with_provenance(report, device), run, "curve", plot_curve)
    c, s = report["curve"], report["line"]
    console.print(f"train-loss barrier: {report['curve_kind']} curve {c['barrier']:.4g}, straight segment "
                  f"{s['barrier']:.4g}; highest test error on the path: curve {max(c['test_err']):.2f}%, "
                  f"segment {max(s['test_err']):.2f}%")
    console.print(f"report: {target} and {target.with_suffix('.png')}; the bend: {run / 'members' / 'bend.pt'}")


DATA_SETTINGS = ("subset", "seed", "val_split", "label_noise", "image_size")  # what decides the examples a run saw


def _new_curve_config(start, end, curve, epochs, lr, weight_decay, batch_size, seed, subset, max_steps, settings,
                      data_dir, out, name):
    """The curve run's config, every option checked before any training: both ends readable, finite and of
    one architecture and dataset, at least two points, examples within the data. The bend sees the end
    runs' data (their subset, seed, split) unless told otherwise; a warning says when it would not."""
    import datetime as dt

    from fastflat import data as datasets
    from fastflat.config import config_from_dict, load_config
    from fastflat.load import check_same_model_and_data
    from fastflat.runs.rundir import load_point

    if not start or not end:
        raise UserError("fastflat curve needs both end points: --from RUN_A --to RUN_B")
    if settings["points"] < 2 or settings["examples"] < 0 or settings["points_at_once"] < 1:
        raise UserError(f"--points must be at least 2 (the two ends), --examples >= 0 and --points-at-once >= 1; got "
                        f"{settings['points']}, {settings['examples']} and {settings['points_at_once']}")
    a, b = (config_from_dict(load_point(p)["config"]) for p in (start, end))  # NaN ends: exit 3 here
    check_same_model_and_data([Path(start), Path(end)], [a, b])
    chosen = {"subset": a.subset if subset is None else subset, "seed": a.seed if seed is None else seed,
              "val_split": a.val_split, "label_noise": a.label_noise, "image_size": a.image_size}
    seeded = any(getattr(c, key) for c in (a, b) for key in ("subset", "val_split", "label_noise"))
    keys = [key for key in DATA_SETTINGS if key != "seed" or seeded]  # the seed picks examples only then
    differ = [f"{key} {getattr(a, key)} / {getattr(b, key)}" for key in keys if getattr(a, key) != getattr(b, key)]
    if settings["examples"]:
        data = datasets.load_dataset(a.dataset, data_dir or a.data_dir, "cpu", a.label_noise, a.seed, image_size=a.image_size,
                                     bad_images=a.bad_images)
        if settings["examples"] > len(data.train):
            raise UserError(f"--examples {settings['examples']} is larger than the {len(data.train)} training examples")
    if differ:  # every check passed: now the warnings
        _warn(f"the end runs saw different data ({', '.join(differ)}): the bend trains on the first's")
    if chosen["subset"] != a.subset:
        _warn(f"the bend trains on --subset {chosen['subset'] or 'all'} while the ends trained on "
              f"{a.subset or 'all'} examples: a curve that beats its ends may only have seen more data")
    return load_config(None, {"method": "curve", "curve.start": start, "curve.end": end, "curve.kind": curve.value,
                              "model": a.model, "dataset": a.dataset, "data_dir": data_dir or a.data_dir,
                              **chosen, "epochs": epochs, "lr": lr, "max_steps": max_steps,
                              "weight_decay": weight_decay, "batch_size": batch_size,  # None: the default
                              "device": settings["device"], "out": str(out),
                              "name": name or f"curve-{curve.value}-{dt.datetime.now():%Y%m%d-%H%M%S}"})


def _warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def _resumable_curve(run: Path) -> dict[str, Any]:
    """The settings a curve run was started with; a run that is not a curve is refused before any work."""
    from fastflat.runs.rundir import load_checkpoint

    config = load_checkpoint(run)["config"]
    if config.get("method") != "curve":
        raise UserError(f"{run} is a --method {config.get('method')} run, not a curve: fastflat curve --resume continues "
                        "curve runs only (fastflat train --resume continues the others)")
    try:
        return json.loads((run / CURVE_SETTINGS).read_text())
    except (OSError, ValueError):  # a run started by fastflat train --method curve: the command's defaults
        return {**CURVE_DEFAULTS, "bn_update": True, "points_at_once": 1, "device": config["device"]}


class _SavingCurveSettings:
    """The command's hooks, plus the evaluation settings written into the run directory as it starts."""

    def __init__(self, hooks: Any, settings: dict[str, Any]):
        self.hooks, self.settings = hooks, settings

    def on_start(self, info: dict[str, Any]) -> None:
        from fastflat.runs.rundir import atomic_write_text

        atomic_write_text(Path(info["run_dir"]) / CURVE_SETTINGS, json.dumps(self.settings) + "\n")
        self.hooks.on_start(info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hooks, name)
