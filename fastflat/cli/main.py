"""The `fastflat` command: every command module registered on one app, and `main`, the entry point.

Every user mistake (bad option, bad config, missing data, unreadable checkpoint) ends as one line on
stderr and exit code 2; `main` guarantees it, including for click's own usage errors.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import typer

from fastflat.cli import train  # noqa: F401  (registers train, runs, eval first: --help lists them first)
from fastflat.cli import analysis, ensemble, landscape, soup  # noqa: F401  (each registers its commands on `app`)
from fastflat.cli.app import app
from fastflat.cli.bench import bench_app
from fastflat.cli.consoles import err_console
from fastflat.cli.launch import ARGV, tell_launcher
from fastflat.errors import NonFiniteError, UserError

try:  # typer >= 0.29 vendors click; older typer depends on it
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError

app.add_typer(bench_app, name="bench", help="Benchmark the fused kernels and training steps (results in benchmarks/results).")


def _with_a_guess(message: str) -> str:
    """A choice that is not one of the allowed values gets the closest one: --method sma (did you mean sam?)."""
    from fastflat.settings import did_you_mean

    found = re.search(r"'([^']*)' is not one of (('[^']*'(, )?)+)", message)
    if found is None:
        return message
    return message.rstrip(".") + did_you_mean(found.group(1), re.findall(r"'([^']*)'", found.group(2)))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; user errors become one stderr line and exit code 2."""
    # torch's "No CUDA runtime is found" note on CPU machines (logged when torch.compile loads its C++
    # toolchain) says nothing a user of this command can act on
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    command = typer.main.get_command(app)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["--help"]  # a bare `fastflat` shows the commands
    ARGV[:] = argv
    try:
        result = command.main(args=argv, prog_name="fastflat", standalone_mode=False)
    except UsageError as e:
        name = e.ctx.command_path if e.ctx is not None else "fastflat"
        err_console.print(f"error: {_with_a_guess(e.format_message())} (see: {name} --help)", highlight=False,
                          markup=False, soft_wrap=True)
        return 2
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # torchrun: every rank refuses alike; rank 0 says it
            err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
            tell_launcher(str(e))
        return 2
    except NonFiniteError as e:  # NaN/inf in weights read back, or in training outside `train` (a curve's bend)
        if os.environ.get("RANK", "0") == "0":
            err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
            tell_launcher(str(e))
        return 3
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
