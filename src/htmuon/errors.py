"""Exceptions shared across the package."""


class UserError(Exception):
    """An error caused by the user's input or environment (a bad flag, a missing file, a full disk):
    the CLI prints it as one line and exits with code 2, without a traceback."""


class CollectiveError(UserError):
    """Under torchrun: a collective (or the process group's start) failed because another rank hung
    past the collective timeout or died; every surviving rank raises it instead of waiting forever."""
