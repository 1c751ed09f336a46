"""Exceptions shared across the package."""


class UserError(Exception):
    """An error caused by the user's input or environment (a bad flag, a missing file, a full disk):
    the CLI prints it as one line and exits with code 2, without a traceback."""


class CollectiveError(UserError):
    """Under torchrun: a collective (or the process group's start) failed because another rank hung
    past the collective timeout or died; every surviving rank raises it instead of waiting forever.

    The process group's threads may still be blocked in the failed collective, and the interpreter's
    normal shutdown can then abort (``std::terminate``, exit -6): the CLI prints the one line and ends
    the process with ``os._exit(2)``; a program that catches it under torchrun should end its process
    the same way rather than return into a normal shutdown."""


class Interrupted(Exception):
    """A run that a signal stopped after writing its checkpoint (``htmuon train``, ``htmuon compare``):
    the CLI prints the message as one line and exits with ``exit_code``, 128 + the signal's number, as
    a shell reports a process the signal ended (SIGTERM 143, SIGINT 130)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def signal_exit_code(name: str) -> int:
    """128 + the number of the signal named in a summary's "signal" (SIGTERM's for one that came to
    another rank and is not named)."""
    import signal

    sig = signal.Signals.__members__.get(name, signal.SIGTERM)
    return 128 + int(sig)
