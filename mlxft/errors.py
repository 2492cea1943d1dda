"""User errors: one line, no traceback, non-zero exit (the CLI turns them into `Error: ...`)."""


class UserError(Exception):
    """Bad input from the user: a file, a line, a key, a value. The message says what to do."""
