"""``htmuon esd``: layer-wise ESD power-law alpha of a checkpoint or a model.

    htmuon esd CHECKPOINT_OR_MODEL [--fit ks|median|fix-finger] [--csv F] [--plot F]

CHECKPOINT_OR_MODEL is a ``.pt``/``.pth`` file holding a state_dict (or a dict with one under
``"model"``), or ``package.module:factory``, a callable that takes no arguments and returns an
``nn.Module`` (e.g. ``torchvision.models:resnet18``). Prints the per-layer table as markdown.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .esd import METHODS
from .powerlaw import FITS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="CHECKPOINT_OR_MODEL",
        help="a .pt/.pth state_dict checkpoint, or package.module:factory returning an nn.Module",
    )
    parser.add_argument(
        "--fit",
        choices=FITS,
        default="ks",
        help="xmin rule: 'ks' (WeightWatcher's default), 'median' (the paper's), 'fix-finger'; default ks",
    )
    parser.add_argument("--csv", metavar="F", help="write the full per-layer table to this CSV file")
    parser.add_argument("--plot", metavar="F", help="write a PNG of layer-wise alpha (needs matplotlib)")
    parser.add_argument("--layers", metavar="REGEX", help="analyse only layers whose name matches REGEX")
    parser.add_argument("--device", default=None, help="compute device (default: where the weights are)")
    parser.add_argument("--method", choices=METHODS, default="auto", help="eigenvalue method (default auto)")


def _load_target(target: str):
    from htmuon.cli import UserError

    if os.path.exists(target):
        return target
    if ":" in target and not target.endswith((".pt", ".pth", ".bin")):
        mod_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise UserError(f"cannot import module {mod_name!r} from {target!r}: {e}") from e
        factory = getattr(module, attr, None)
        if factory is None:
            raise UserError(f"module {mod_name!r} has no attribute {attr!r}")
        import torch

        obj = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
        if not isinstance(obj, torch.nn.Module):
            raise UserError(f"{target!r} gave a {type(obj).__name__}, not an nn.Module")
        return obj
    raise UserError(f"no such checkpoint file: {target!r} (or give package.module:factory for a model)")


def main(args: argparse.Namespace) -> int:
    from htmuon.cli import UserError

    from .esd import analyze

    obj = _load_target(args.target)
    try:
        report = analyze(obj, fit=args.fit, layers=args.layers, device=args.device, method=args.method)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    print(report.to_markdown())
    if args.csv:
        print(f"wrote {report.to_csv(args.csv)}", file=sys.stderr)
    if args.plot:
        try:
            from .plots import plot_layer_alpha

            label = os.path.basename(args.target) if isinstance(obj, str) else args.target
            print(f"wrote {plot_layer_alpha({label: report}, args.plot)}", file=sys.stderr)
        except ImportError as e:
            raise UserError(str(e)) from e
    return 0
