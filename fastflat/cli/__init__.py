"""The `fastflat` command line: one module per command group, registered on `app.app`; `main` runs it."""

from fastflat.cli.main import app, main

__all__ = ["app", "main"]
