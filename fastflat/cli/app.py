"""The `fastflat` Typer app that every command module registers on, and the option helper they share."""

from __future__ import annotations

from typing import Annotated, Any

import typer
import typer.rich_utils
from rich.table import Table

from fastflat.cli.consoles import console


class _WholeOptionNames(Table):
    """Typer's help table with the option names whole: in 80 columns Rich would otherwise cut them with
    an ellipsis (--checkpoint-eve…), and a cut name cannot be copied. The name columns never wrap;
    the others (metavar, help) wrap, or fold a word too long for them, instead of cutting it."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(*renderables, **kwargs)
        for column in self.columns:
            names = all(str(getattr(cell, "plain", cell)).startswith("-") or not str(getattr(cell, "plain", cell))
                        for cell in column._cells)
            column.no_wrap, column.overflow = (True, "ellipsis") if names else (False, "fold")
            for cell in column._cells if not names else ():
                for text in getattr(cell, "renderables", [cell]):  # typer's help is Text, or Columns of Text
                    if hasattr(text, "overflow"):
                        text.overflow = "fold"


typer.rich_utils.Table = _WholeOptionNames  # the help panels are built from this name

app = typer.Typer(
    name="fastflat", rich_markup_mode="rich", add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Train toward flat minima (SGD, SAM, SWA, Spartan ES) and build cheap ensembles (snapshots, FGE) with fused Triton kernels.",
)


def opt(help: str, panel: str, default: Any = None, **kw) -> Any:
    """An option in the help panel `panel`, its default shown dim after the help text."""
    shown = f" [dim]\\[default: {default}][/dim]" if default is not None else ""
    return typer.Option(help=help + shown, rich_help_panel=panel, show_default=False, **kw)


def _print_version(value: bool) -> None:
    if value:
        import torch

        from fastflat.version import __version__

        console.print(f"fastflat {__version__} (torch {torch.__version__})", highlight=False)
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Train toward flat minima (SGD, SAM, SWA, Spartan ES) and build cheap ensembles (snapshots, FGE) with fused Triton kernels."""


