"""Exceptions shared across the package."""


class UserError(Exception):
    """An error caused by the user's input (a bad flag, a missing file): the CLI prints it as one line
    and exits with code 2, without a traceback."""
