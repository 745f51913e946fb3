"""The two Rich consoles every command prints to (stdout for results, stderr for errors and progress).

Piped output (a log file, nohup, CI) is read later, not in an 80-column window: there, lines are never
wrapped and table cells never cut (COLUMNS, when set, still wins).
"""

import os

from rich.console import Console

PIPED_WIDTH = 220


def _wide_when_piped(console: Console) -> Console:
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


console = _wide_when_piped(Console())
err_console = _wide_when_piped(Console(stderr=True))


def plural(count: int, word: str, many: str | None = None) -> str:
    """'1 run', '2 runs' ('1 process', '2 processes' with many=)."""
    return f"{count} {word if count == 1 else many or word + 's'}"
