"""Errors a user caused (bad option, malformed config, missing dataset, corrupt checkpoint).

The CLI prints a UserError as one line on stderr and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and, where there is one, the fix."""
