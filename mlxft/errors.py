"""User errors: one line, no traceback, non-zero exit.

Library code raises `UserError`; each command is wrapped in `user_errors`, which prints it as
`Error: <one line>` and exits with status 2.  Both live here, below every command, so that a
command never has to import the CLI module to get them.
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input from the user: a file, a line, a key, a value. The message says what to do."""


def user_errors(fn):
    """Turn a UserError into `Error: <one line>` and exit status 2; Ctrl-C into status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import click

        try:
            return fn(*args, **kwargs)
        except UserError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper
