"""The `fastflat` Typer app that every command module registers on, and the option helper they share."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fastflat.cli.consoles import console

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


