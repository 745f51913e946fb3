"""Where the analysis commands write: one vocabulary for all of them.

Every command takes `--out` (the parent folder, default runs/, as `fastflat train`) and `--name`, and writes
into a new directory out/name (default <command>-<what>-<time>). An existing directory is never written
into: the first free NAME, NAME-2, ... is taken, as for training runs, and the path is printed. Scores
that resume (landscape and curve points) are cached by their content in out/.points-cache, shared by
every command writing under `out`, so rerunning an interrupted command continues where it stopped.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

OUT_DEFAULT = Path("runs")
Out = Annotated[Path, typer.Option(help="Parent folder of the results directory (as fastflat train's --out).")]
Name = Annotated[str | None, typer.Option(help="Results directory name (default: <command>-<what>-<time>); an "
                                               "existing one is never overwritten (NAME-2 is taken).")]


def results_dir(out: Path, name: str | None, stem: str) -> Path:
    """A new, empty directory out/name (or out/<stem>-<time>) for one command's results."""
    from fastflat.runs.rundir import RunDir

    return RunDir.create(out, name or f"{stem}-{dt.datetime.now():%Y%m%d-%H%M%S}").path


def points_cache(out: Path) -> Path:
    """The content-keyed cache of scored points under `out`: a rerun of the same command reuses it."""
    return Path(out) / ".points-cache"
