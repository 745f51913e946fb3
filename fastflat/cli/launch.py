"""`fastflat train --nproc N`: the same command under torch.distributed.run, and what rank 0 tells the
launcher (its last line) so that the launcher can repeat it after torchrun's report."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from fastflat.cli.consoles import err_console
from fastflat.errors import Interrupted, UserError


def stop_display(hooks: Any) -> None:
    """End rank 0's live display before an error line; other ranks have no display (plain Hooks)."""
    stop = getattr(hooks, "stop", None)
    if stop is not None:
        stop()


def launch(nproc: int, device: str) -> int:
    """fastflat train --nproc N ...: the same command under torch.distributed.run, N processes here."""
    import subprocess

    import torch

    cuda = device != "cpu" and torch.cuda.is_available()
    available = torch.cuda.device_count() if cuda else (os.cpu_count() or 1)
    if not 1 <= nproc <= available:
        where = f"{available} CUDA device(s)" if cuda else f"{available} CPU cores"
        raise UserError(f"--nproc {nproc}: this machine has {where}; use 1 to {available}")
    argv, skip = [], False
    for arg in ARGV:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fastflat", *argv]
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        error_file = Path(folder) / "error"
        env = {**os.environ, ERROR_FILE_ENV: str(error_file)}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # torchrun's banner otherwise
        code = wait_for_torchrun(subprocess.Popen(command, env=env))
        said = error_file.read_text().strip() if error_file.exists() else ""
    if code == 0:
        return 0
    if said.startswith("interrupted"):  # Ctrl-C: rank 0's checkpoint line again, after torchrun's report
        err_console.print(said, highlight=False, markup=False, soft_wrap=True)
        return 130
    if said:  # a user error on the ranks (each stopped before training): the one line that matters, last
        err_console.print(f"error: {said}", highlight=False, markup=False, soft_wrap=True)
    else:  # torchrun stopped every rank when one failed; checkpoints are written whole or not at all
        err_console.print(f"error: a process of the {nproc}-process job failed (torchrun exit {code}, its report "
                          "above); the last checkpoint is kept: continue with --resume", highlight=False, soft_wrap=True)
    return 2


def wait_for_torchrun(process) -> int:
    """Wait for torchrun, outliving a Ctrl-C (the terminal sends it to torchrun and every rank too: they
    checkpoint and stop) so the last line can say what was kept; a SIGTERM is passed on to torchrun."""
    import signal

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))}
    try:
        return process.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


ARGV: list[str] = []  # the command line main() was given, for --nproc to pass on
ERROR_FILE_ENV = "FASTFLAT_ERROR_FILE"  # set by --nproc: rank 0 leaves a user error's message there


def tell_launcher(message: str) -> None:
    """Under `--nproc`: leave rank 0's last line for the launcher, which repeats it after torchrun's report."""
    if os.environ.get(ERROR_FILE_ENV):
        Path(os.environ[ERROR_FILE_ENV]).write_text(message)


def interrupted_message(error: KeyboardInterrupt, run_dir: str | None, command: str = "fastflat train") -> str:
    """Say what a stop kept: the checkpoint of the last whole step, or that nothing was saved."""
    if isinstance(error, Interrupted) and error.saved_step is not None:
        return f"interrupted: checkpoint saved at step {error.saved_step}; continue with: {command} --resume {run_dir}"
    if run_dir is not None and (Path(run_dir) / "checkpoint.pt").exists():
        return (f"interrupted without saving this step; the last checkpoint is kept; continue with: "
                f"{command} --resume {run_dir}")
    return "interrupted before training started: no checkpoint was written, nothing to resume"


