"""The reproduce scripts name fastflat's options by hand: each option they pass must exist, so a renamed
option cannot silently break a results table's recipe."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from fastflat.cli import app

SCRIPTS = sorted((Path(__file__).parent.parent / "scripts").glob("reproduce_*.sh"))
GROUPS = ("landscape", "bench")  # commands with subcommands


def invocations(text: str) -> list[list[str]]:
    """Each `$FF ...` command line (continuations joined), as tokens after $FF."""
    joined = text.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        for part in re.split(r"\|\||&&|;|\bthen\b|\belse\b", line):
            if "$FF " in part:
                tokens = shlex.split(part.split("$FF ", 1)[1].split("#")[0], posix=True)
                found.append([t for t in tokens if not t.startswith(("$", ">"))])
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_option_a_reproduce_script_passes_exists(script):
    root = typer.main.get_command(app)
    calls = invocations(script.read_text())
    assert calls, f"{script.name} runs no fastflat command"
    for tokens in calls:
        command, rest = root.commands[tokens[0]], tokens[1:]
        if tokens[0] in GROUPS:
            command, rest = command.commands[rest[0]], rest[1:]
        known = {o for p in command.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
        unknown = [t for t in rest if t.startswith("--") and t.split("=")[0] not in known]
        assert not unknown, f"{script.name}: fastflat {tokens[0]} has no {unknown}"
