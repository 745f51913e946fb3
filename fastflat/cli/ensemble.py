"""`fastflat ensemble`: thin command over fastflat.analysis.ensemble (and curve ensembles from fastflat.geometry.landscape),
registered on the main app (fastflat.cli imports this module after defining it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fastflat.cli.app import app
from fastflat.cli.consoles import console, err_console, plural
from fastflat.cli.outputs import OUT_DEFAULT, Name, Out, results_dir
from fastflat.errors import UserError


@app.command("ensemble")
def ensemble_command(
    fge: Annotated[list[Path] | None, typer.Option("--fge", help="An FGE run: ensemble its collected models (repeatable with --budgets).")] = None,
    sse: Annotated[list[Path] | None, typer.Option("--sse", help="A snapshot-ensemble run: ensemble its snapshots (repeatable with --budgets).")] = None,
    swa: Annotated[Path | None, typer.Option("--swa", help="An SWA run: compare its final and SWA weights.")] = None,
    runs: Annotated[list[Path] | None, typer.Option("--from", help="Independently trained runs (repeat): the Ind ensemble.")] = None,
    sse_keep: Annotated[str | None, typer.Option("--sse-keep", help="Snapshot ensembles: ensemble the last K snapshots (0 = all; auto = the K best on the run's validation split, see train --val-split; default: the run's own --sse-keep).")] = None,
    budgets: Annotated[bool, typer.Option("--budgets", help="Budget view: error at 1, 2, 3... budgets for Ind (--from), SSE and FGE runs.")] = False,
    curve: Annotated[Path | None, typer.Option("--curve", help="A trained curve (fastflat curve): ensemble --points evenly spaced points on it.")] = None,
    points: Annotated[int, typer.Option("--points", help="With --curve: points t = 0 .. 1 in the ensemble (BatchNorm re-estimated at each).")] = 5,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset files.")] = None,
    out: Out = OUT_DEFAULT, name: Name = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of a table.")] = False,
) -> None:
    """Evaluate an ensemble: accuracy, NLL, ECE of the ensemble and each member, disagreement, and a plot.

    With --budgets: the papers' budget table, test error of Ind, SSE and FGE at 1, 2, 3... budgets."""
    from fastflat.analysis.ensemble import budget_report, reporting_progress, runs_report, write_report
    from fastflat.cli.progress import progress_bar

    groups = {"ind": runs or [], "sse": sse or [], "fge": fge or []}
    if curve is not None:
        if any(groups.values()) or swa is not None or budgets or sse_keep is not None:
            raise UserError("--curve takes a curve run alone (with --points K), not with other runs or --budgets")
        return _curve_ensemble(curve, points, device, data_dir, out, name, as_json)
    keep = _parse_keep(sse_keep)
    if keep is not None and not sse:
        raise UserError("--sse-keep picks snapshots of --sse runs; no --sse run was given")
    if budgets:
        if swa is not None:
            raise UserError("--budgets takes --from, --sse and --fge runs, not --swa")
        if keep == "auto":
            raise UserError("--sse-keep auto chooses k for one --sse run; the budget view takes a number")
        if not any(groups.values()):
            raise UserError("--budgets needs runs: --from RUN (Ind), --sse RUN, --fge RUN, each repeatable")
        with progress_bar(err_console, "members") as progress, reporting_progress(progress):
            report = budget_report(groups, keep, device, data_dir)
        target = results_dir(out, name, "ensemble-budgets") / "ensemble.json"
    else:
        chosen = [(k, r) for k, rs in (("fge", fge or []), ("sse", sse or [])) for r in rs] + (
            [("swa", swa)] if swa is not None else []) + [("final", r) for r in runs or []]
        kinds = {k for k, _ in chosen}
        if not chosen or len(kinds) > 1 or (kinds != {"final"} and len(chosen) > 1):
            raise UserError("give exactly one of --fge RUN, --sse RUN, --swa RUN, or --from RUN (repeatable)")
        kind = chosen[0][0]
        with progress_bar(err_console, "members") as progress, reporting_progress(progress):
            report = runs_report(kind, [r for _, r in chosen], keep, device, data_dir)
        target = results_dir(out, name, f"ensemble-{kind}") / "ensemble.json"
    write_report(report, target)
    if as_json:
        print(json.dumps(report))
    elif budgets:
        _print_budgets(report, target)
    else:
        _print_ensemble(report, target)


def _curve_ensemble(run: Path, points: int, device: str, data_dir: str | None, out: Path, name: str | None,
                    as_json: bool) -> None:
    from fastflat.runs.rundir import json_safe
    from fastflat.geometry.landscape import curve_ensemble
    from fastflat.runs.rundir import atomic_write_text

    from fastflat.cli.progress import progress_bar

    with progress_bar(err_console, "curve points") as progress:
        report = curve_ensemble(run, points, device=device, data_dir=data_dir, progress=progress)
    target = results_dir(out, name, "ensemble-curve") / "ensemble.json"  # made once the report exists
    atomic_write_text(target, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    if as_json:
        print(json.dumps(json_safe(report)))
        return
    from rich.table import Table

    table = Table(title=f"ensemble of {points} points on the {report['curve_kind']} curve {run}")
    for column in ("t", "test error alone", "ensemble of the first k"):
        table.add_column(column, justify="right")
    for member, grown in zip(report["members"], report["ensemble_err_by_size"]):
        table.add_row(f"{member['t']:.3f}", f"{member['test_err']:.2f}%", f"{grown:.2f}%")
    console.print(table)
    console.print(f"report: {target}")


def _parse_keep(value: str | None) -> int | str | None:
    """--sse-keep: None (the run's own), 'auto', or a count >= 0."""
    if value is None or value == "auto":
        return value
    if not value.isdigit():
        raise UserError(f"--sse-keep takes a number of snapshots (0 = all) or auto, not {value!r}")
    return int(value)


def _print_ensemble(report: dict[str, Any], target: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{report['kind']} ensemble of {plural(len(report['members']), 'model')}")
    for column in ("model", "accuracy", "NLL", "ECE", "ensemble acc. (first k)"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for m, curve in zip(report["members"], report["accuracy_by_size"]):
        table.add_row(Path(m["member"]).parent.name + "/" + Path(m["member"]).name, f"{m['acc']:.2f}%",
                      f"{m['nll']:.4f}", f"{m['ece']:.2f}%", f"{curve:.2f}%")
    e = report["ensemble"]
    if report["kind"] != "swa":
        table.add_row("[bold]ensemble", f"[bold]{e['acc']:.2f}%", f"{e['nll']:.4f}", f"{e['ece']:.2f}%", "")
    console.print(table)
    if "validation" in report:  # choices made without the test set
        v = report["validation"]
        chosen_k = f"last {len(report['members'])} of {len(v['member_acc'])} members; " if report["kind"] == "sse" else ""
        console.print(f"validation ({v['size']} held-out training examples): {chosen_k}best member alone "
                      f"{Path(v['best_member']).name}, test accuracy {v['best_member_test']['acc']:.2f}%")
    console.print(f"mean pairwise disagreement {report['disagreement']:.2f}%  -  report: {target} and {target.with_suffix('.png')}")


def _print_budgets(report: dict[str, Any], target: Path) -> None:
    from rich.table import Table

    rows = report["rows"]
    most = max(int(k) for row in rows.values() for k in row)
    table = Table(title=f"test error (%) at k budgets, B = {report['budget_epochs']} epochs "
                        f"(best single member in brackets)")
    table.add_column("method")
    for k in range(1, most + 1):
        table.add_column(f"{k}B", justify="right")
    for kind, row in rows.items():
        cells = [f"{row[k]['error']:.2f} ({row[k]['best_member_error']:.2f})" if k in row else "-"
                 for k in range(1, most + 1)]
        table.add_row(kind.upper() if kind != "ind" else "Ind", *cells)
    console.print(table)
    console.print(f"report: {target} and {target.with_suffix('.png')}")
