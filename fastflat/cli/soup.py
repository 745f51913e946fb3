"""`fastflat soup`: thin command over fastflat.analysis.soup, registered on the main app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fastflat.cli.app import app
from fastflat.cli.consoles import console, err_console, plural
from fastflat.cli.outputs import OUT_DEFAULT, Name, Out, results_dir


@app.command("soup")
def soup_command(
    runs: Annotated[list[Path], typer.Argument(help="Fine-tuned runs of one model and dataset, ideally from one "
                                                    "--init checkpoint (fastflat train --init PRE ...).")],
    greedy: Annotated[bool, typer.Option("--greedy/--uniform-only", help="Also the greedy soup: ingredients by "
                                         "validation accuracy, each kept only if the soup does not get worse.")] = True,
    val_split: Annotated[float | None, typer.Option(help="Hold out this share of the training set for validation "
                                                         "(default: the runs' own --val-split).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset files.")] = None,
    out: Out = OUT_DEFAULT, name: Name = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of a table.")] = False,
) -> None:
    """Model soups: the uniform and greedy averages of fine-tuned runs, against each run and their ensemble."""
    from fastflat.analysis.plots import plot_soup
    from fastflat.analysis.soup import soup_report
    from fastflat.cli.progress import progress_bar
    from fastflat.errors import UserError
    from fastflat.runs.rundir import atomic_write_text, json_safe, provenance
    from fastflat.loss.evaluation import resolve_device

    if val_split is not None and not 0 < val_split < 1:
        raise UserError(f"--val-split {val_split}: a share of the training set in (0, 1)")
    with progress_bar(err_console, "soup") as progress:
        report = soup_report([str(r) for r in runs], greedy, val_split, device, data_dir, progress)
    report["provenance"] = provenance(resolve_device(device))
    folder = results_dir(out, name, "soup")
    atomic_write_text(folder / "soup.json", json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    plot_soup(report, folder / "soup.png")
    for warning in report["warnings"]:
        err_console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(json_safe(report)))
        return
    from rich.table import Table

    table = Table(title=f"soups of {plural(len(runs), 'run')} ({report['validation']['size']:,} validation examples)")
    for column in ("model", "validation acc.", "test acc.", "test NLL", "test ECE"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for i in report["ingredients"]:
        table.add_row(Path(i["run"]).name, f"{i['val_acc']:.2f}%", f"{i['test']['acc']:.2f}%", f"{i['test']['nll']:.4f}",
                      f"{i['test']['ece']:.2f}%")
    for kind in ("uniform", "greedy"):
        if kind in report:
            s = report[kind]
            table.add_row(f"[bold]{kind} soup ({plural(len(s['members']), 'run')})", f"{s['val_acc']:.2f}%",
                          f"[bold]{s['test']['acc']:.2f}%", f"{s['test']['nll']:.4f}", f"{s['test']['ece']:.2f}%")
    e = report["ensemble"]["test"]
    table.add_row("ensemble of all (one model each)", "", f"{e['acc']:.2f}%", f"{e['nll']:.4f}", f"{e['ece']:.2f}%")
    console.print(table)
    console.print(f"report: {folder / 'soup.json'} and {folder / 'soup.png'}")
