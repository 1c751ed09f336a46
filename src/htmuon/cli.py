"""The ``htmuon`` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``configure(parser)`` (add the
arguments; keep the module's top-level imports light) and ``main(args) -> int``
(do the work; import heavy dependencies there). A user mistake or an environment
failure (a full disk, a read-only folder, a corrupt file, a hung torchrun rank) is reported as a
one-line error (``htmuon COMMAND: error: ...``) with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import stat
import sys

from .errors import CollectiveError, Interrupted, UserError

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("htmuon.demo", "train a small classifier on scikit-learn's digits with Muon and HTMuon"),
    "train": (
        "htmuon.train.cli",
        "one training run (LLaMA or ResNet) from a preset, a config file and/or flags",
    ),
    "compare": ("htmuon.train.compare", "a grid of optimizers x seeds (x lrs): markdown table and plots"),
    "esd": ("htmuon.diagnostics.cli", "layer-wise ESD power-law alpha of a checkpoint or model"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to read more, no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unrecognized(self, extra: list[str]) -> None:
        """Refuse unknown arguments, suggesting the closest option of this (sub)command."""
        options = [s for a in self._actions for s in a.option_strings]
        closes = []
        for token in extra:
            if token.startswith("-"):
                closes += difflib.get_close_matches(token.split("=")[0], options, n=1)
        hint = f" (did you mean {', '.join(closes)}?)" if closes else ""
        if "--resume" in extra and self.prog.endswith("compare"):
            hint = (
                " (compare resumes by itself: run the same command again; finished cells are reused "
                "and an interrupted one continues from its checkpoint. --resume is htmuon train's)"
            )
        if any(token.lower() in ("true", "false", "yes", "no", "on", "off") for token in extra):
            hint += " (a boolean key is a switch without a value: --KEY / --no-KEY)"
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    # allow_abbrev=False: a prefix of a longer flag is refused, not silently taken for it (compare's
    # --seed, --lr, --optimizer would otherwise become --seeds, --lr-grid, --optimizers)
    parser = Parser(prog="htmuon", description="HTMuon optimizer toolkit", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"htmuon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        module.configure(sp)
        sp.set_defaults(_module=module_name)
    return parser


def _stdout_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no real stdout (pytest's capture, a closed one)
        return False


def _exit_code(code: int, force: bool = False) -> int:
    """``code`` for a command that failed; in a process that joined a torch.distributed process group
    (or with ``force``: a peer hung or died), the process ends here with ``os._exit(code)``.

    The group's threads may still wait in a collective, or on a peer that is closing its connections
    (ranks refused at the start for different flags), and the interpreter's shutdown then aborts at
    times (std::terminate, "terminate called without an active exception", exit -6: 2 of 25 runs of two
    refused ranks) instead of exiting with ``code``."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group, and no need to import torch
    if force or (dist is not None and dist.is_available() and dist.is_initialized()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].unrecognized(extra)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except UserError as e:
        print(f"htmuon {args.command}: error: {e}", file=sys.stderr)
        return _exit_code(2, force=isinstance(e, CollectiveError))
    except OSError as e:  # the environment (disk full, read-only, permissions) where no UserError named it
        if isinstance(e, BrokenPipeError) and _stdout_is_a_pipe():
            # the reader of the output went away (`htmuon compare --status | head`): not an error;
            # stdout goes to /dev/null so that the interpreter's last flush does not report it either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, as a shell reports a command stopped by a closed pipe
        where = f"'{e.filename}': " if e.filename else ""
        print(f"htmuon {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return _exit_code(2)
    except Interrupted as e:  # stopped by a signal, with a checkpoint
        print(f"htmuon {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"htmuon {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["SUBCOMMANDS", "UserError", "build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover - `python -m htmuon.cli`; prefer `python -m htmuon`
    from htmuon.cli import main as _main  # the package's module, so UserError is the same class

    sys.exit(_main())
