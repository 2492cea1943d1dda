"""User errors: one line, no traceback, non-zero exit.

Library code raises `UserError`; each command is wrapped in `user_errors`, which prints it as
`Error: <one line>` and exits with status 2.  Both live here, below every command, so that a
command never has to import the CLI module to get them.

In a data-parallel run (`mlxft.training.world`) every rank is a process of its own: rank 0
prints its errors as above, any other rank prefixes `rank N:`, and an error that every rank
raises alike (`every_rank`: it follows from the shared command line or from values the ranks
agreed on) is printed by rank 0 alone; the other ranks leave quietly with status 0, since the
launchers terminate every rank as soon as one exits non-zero, which could cut rank 0 short.
"""

from __future__ import annotations

import functools
import re
import sys
import threading

from mlxft import flags


class UserError(Exception):
    """Bad input from the user: a file, a line, a key, a value. The message says what to do."""

    def __init__(self, message: str = "", *, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def engine_message(err: BaseException) -> str:
    """A tensor engine's error, short enough for one line: its first sentence, without the
    source-file location gloo and MLX put in front (`[…/pair.cc:537] Read error …`)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", text)
    return text.split(". ")[0][:200]


def error_line(message: str) -> str:
    """`Error: message` as this process prints it (prefixed with the rank on ranks other than 0)."""
    rank = flags.launch_rank()
    message = re.sub(r"\s*\n\s*", " ", message.strip())  # a library's multi-line text, too
    return f"Error: {message}" if not rank else f"Error: rank {rank}: {message}"


class _Leaving:
    """Which thread ends the process: the main thread with a UserError, or the watchdog
    (`mlxft.training.watchdog`: a collective that timed out, the launcher's SIGTERM).  Both
    can happen at once when a peer dies (the collective fails, then the launcher terminates
    the rank); only the first speaks, so a failing rank prints one line."""

    def __init__(self):
        self._lock = threading.Lock()
        self.owner = None
        self.said = threading.Event()  # the owner's line is out

    def claim(self, owner: str) -> bool:
        with self._lock:
            if self.owner is None:
                self.owner = owner
            return self.owner == owner


LEAVING = _Leaving()


def user_errors(fn):
    """Turn a UserError into `Error: <one line>` and exit status 2; Ctrl-C into status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import click

        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if err.every_rank and flags.launch_rank():
                # rank 0 says it; a non-zero status here would make the launcher (mlx.launch,
                # torchrun) terminate rank 0 before it could
                sys.exit(0)
            if LEAVING.claim("main"):
                click.echo(error_line(str(err)), err=True)
            LEAVING.said.set()
            sys.exit(2)
        except KeyboardInterrupt:
            if not flags.launch_rank():
                click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper
