"""The ``htmuon`` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``configure(parser)`` (add the
arguments; keep the module's top-level imports light) and ``main(args) -> int``
(do the work; import heavy dependencies there). A user mistake or an environment
failure (a full disk, a read-only folder, a corrupt file, a hung torchrun rank) is reported as a
one-line error (``htmuon COMMAND: error: ...``) with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="htmuon", description="HTMuon optimizer toolkit")
    parser.add_argument("--version", action="version", version=f"htmuon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(sp)
        sp.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except UserError as e:
        print(f"htmuon {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (disk full, read-only, permissions) where no UserError named it
        where = f"'{e.filename}': " if e.filename else ""
        print(f"htmuon {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"htmuon {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["SUBCOMMANDS", "UserError", "build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover - `python -m htmuon.cli`; prefer `python -m htmuon`
    from htmuon.cli import main as _main  # the package's module, so UserError is the same class

    sys.exit(_main())
