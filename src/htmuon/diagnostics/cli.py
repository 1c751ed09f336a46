"""``htmuon esd``: layer-wise ESD power-law alpha of one or more checkpoints or models.

    htmuon esd TARGET [TARGET ...] [--fit ks|median|fix-finger] [--csv F] [--plot F] [--allow-pickle]

Each TARGET is a checkpoint file or folder that :func:`~htmuon.diagnostics.readers.open_checkpoint`
reads (a Hugging Face model folder with safetensors or ``pytorch_model.bin``, sharded or not; a
torch.distributed.checkpoint folder; an htmuon run folder or ``ckpt.pt``; a Lightning ``.ckpt``; a
``.pt``/``.pth`` state_dict), or ``package.module:factory``, a callable that takes no arguments and
returns an ``nn.Module`` (e.g. ``torchvision.models:resnet18``). One target: its per-layer table as
markdown. Several: one alpha column per target, side by side, labelled by the run or folder name.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import os
import re
import sys

from .esd import COLUMNS, METHODS
from .powerlaw import FITS

#: ``package.module:factory``.
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
#: the folders of an ``htmuon compare`` cell below its optimizer's: ``lr0.01[-alr0.111]`` and ``seed0``
_CELL_FOLDER = re.compile(r"seed\d+|lr[\d.e+-]+(-alr[\d.e+-]+)?")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="a checkpoint file or folder (Hugging Face, DCP, htmuon run, Lightning .ckpt, .pt state_dict), "
        "or package.module:factory returning an nn.Module; several targets are compared side by side",
    )
    parser.add_argument(
        "--fit",
        choices=FITS,
        default="ks",
        help="xmin rule: 'ks' (WeightWatcher's default), 'median' (the paper's), 'fix-finger'; default ks",
    )
    parser.add_argument(
        "--csv",
        metavar="F",
        help="write the full per-layer table to this CSV file (several targets: with a 'target' column)",
    )
    parser.add_argument(
        "--plot",
        metavar="F",
        help="write a plot of layer-wise alpha, one series per target, in the format its suffix names "
        "(.png, .pdf, .svg, ...; needs matplotlib)",
    )
    parser.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="the label of a target in the table and plot, once per target in order "
        "(default: the run or folder name)",
    )
    parser.add_argument("--layers", metavar="REGEX", help="analyse only layers whose name matches REGEX")
    parser.add_argument("--device", default=None, help="compute device (default: where the weights are)")
    parser.add_argument("--method", choices=METHODS, default="auto", help="eigenvalue method (default auto)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load files that pickle Python objects (torch.save(model)); this EXECUTES CODE from "
        "the file: only for files you trust",
    )


def _is_factory(target: str) -> bool:
    """``package.module:factory`` (dotted names, a ``:``), not a path: ``runs/exp:1`` is a missing folder."""
    return _FACTORY.fullmatch(target) is not None and not os.path.exists(target)


def _load_target(target: str, allow_pickle: bool = False):
    """A :class:`~.readers.Checkpoint` for a path, or the ``nn.Module`` a factory returns."""
    from htmuon.errors import UserError

    from .readers import open_checkpoint

    if os.path.exists(target):
        try:
            return open_checkpoint(target, allow_pickle=allow_pickle)
        except (ValueError, OSError, ImportError) as e:  # ImportError: safetensors not installed
            raise UserError(str(e)) from e
    if _is_factory(target):
        mod_name, _, attr = target.partition(":")
        # the current folder first, as `python -m` and uvicorn's module:attr targets do: the `htmuon`
        # console script's sys.path[0] is its own bin folder, so `htmuon esd mymodels:mlp` next to
        # mymodels.py would not find it otherwise
        cwd = os.getcwd()
        added = "" not in sys.path and cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise UserError(f"cannot import module {mod_name!r} from {target!r}: {e}") from e
        finally:
            if added:
                sys.path.remove(cwd)
        factory = getattr(module, attr, None)
        if factory is None:
            raise UserError(f"module {mod_name!r} has no attribute {attr!r}")
        import torch

        if callable(factory) and not isinstance(factory, torch.nn.Module):
            try:
                obj = factory()
            except Exception as e:  # a class that needs arguments, a factory that fails
                first = str(e).splitlines()[0] if str(e) else ""
                raise UserError(
                    f"{target!r}: calling {attr}() failed ({type(e).__name__}: {first})"
                ) from None
        else:
            obj = factory
        if not isinstance(obj, torch.nn.Module):
            raise UserError(f"{target!r} gave a {type(obj).__name__}, not an nn.Module")
        return obj
    raise UserError(
        f"no such checkpoint file or folder: {target!r} (or give package.module:factory for a model)"
    )


def target_labels(targets: list[str]) -> list[str]:
    """One distinct label per target: a folder's name, a file's folder name (the run; ``run/file``
    when several files of one folder are given), a factory as given; equal labels get their parent
    folders until they differ, then ``#k``. A compare cell's folder (``OPTIMIZER/lr*/seed*``) is
    named from its optimizer's folder down: ``lr0.01-alr0.111/seed0`` alone does not say which.

    Example:
        >>> target_labels(["runs/a/ckpt.pt", "runs/b/ckpt.pt", "hf/llama/"])
        ['a', 'b', 'llama']
        >>> target_labels(["grid/muon/lr0.01-alr0.111/seed0/", "grid/htmuon/lr0.04-alr0.0333/seed0/"])
        ['muon/lr0.01-alr0.111/seed0', 'htmuon/lr0.04-alr0.0333/seed0']
    """
    paths = [None if _is_factory(t) else os.path.abspath(t) for t in targets]
    files = [
        p for p, t in zip(paths, targets) if p is not None and not (os.path.isdir(p) or t.endswith(os.sep))
    ]
    folders = {p for p in paths if p is not None and p not in files}
    chains: list[list[str]] = []
    for t, p in zip(targets, paths):
        if p is None:
            chains.append([t])
            continue
        parts = [x for x in p.split(os.sep) if x] or [p]
        if p in files and len(parts) > 1:
            # several files of one folder, or a file beside its folder given too: the file's name counts
            folder = os.path.dirname(p)
            shared = sum(os.path.dirname(f) == folder for f in files) > 1 or folder in folders
            parts = parts if shared else parts[:-1]  # the run folder; with its siblings, the file too
            first = len(parts) - (2 if shared else 1)
        else:
            first = len(parts) - 1
        cells = 0  # compare's lr*/seed* folders at the end of the run folder's path: start above them
        while cells < first and _CELL_FOLDER.fullmatch(parts[first - cells]):
            cells += 1
        first -= cells
        chains.append(["/".join(parts[i:]) for i in range(first, -1, -1)])
    level = [0] * len(targets)
    while True:
        labels = [c[min(k, len(c) - 1)] for c, k in zip(chains, level)]
        dup = [i for i, lab in enumerate(labels) if labels.count(lab) > 1 and level[i] < len(chains[i]) - 1]
        if not dup:
            break
        for i in dup:
            level[i] += 1
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if labels.count(lab) == 1 else f"{lab}#{seen[lab]}")
    return out


def _check_output(path: str, flag: str) -> None:
    """Fail before the analysis if ``path`` cannot be written (folders are created as needed)."""
    from htmuon.errors import UserError

    if os.path.isdir(path):
        raise UserError(f"cannot write {flag} {path!r}: it is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {flag} {path!r}: {folder!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {flag} {path!r}: permission denied")


def _write_csv(reports: dict, path: str) -> str:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    if len(reports) == 1:
        return next(iter(reports.values())).to_csv(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["target", *COLUMNS])
        w.writeheader()
        for label, rep in reports.items():
            for r in rep.rows:
                w.writerow({"target": label, **r, "shape": "x".join(map(str, r["shape"]))})
    return path


def main(args: argparse.Namespace) -> int:
    from htmuon.errors import UserError

    from .esd import alpha_table, analyze

    targets = list(args.targets)
    if args.label is not None and len(args.label) != len(targets):
        raise UserError(
            f"--label given {len(args.label)} times for {len(targets)} targets; give one per target"
        )
    labels = list(args.label) if args.label is not None else target_labels(targets)
    if len(set(labels)) != len(labels):
        raise UserError(f"--label values must differ, got {labels}")
    for path, flag in ((args.csv, "--csv"), (args.plot, "--plot")):
        if path is not None and not path.strip():  # `--csv "$OUT"` with OUT unset: not a silent no-op
            raise UserError(f"{flag} needs a file name, got {path!r}")
        if path:
            _check_output(path, flag)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before the analysis, not after it
        raise UserError("--plot needs matplotlib: pip install htmuon[plot]")
    if args.plot:
        from .plots import plot_format

        try:
            plot_format(args.plot)  # a suffix matplotlib cannot write: now, not after the analysis
        except ValueError as e:
            raise UserError(f"--plot: {e}") from None

    reports = {}
    for target, label in zip(targets, labels):
        obj = _load_target(target, args.allow_pickle)
        try:
            report = analyze(obj, fit=args.fit, layers=args.layers, device=args.device, method=args.method)
        except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
            # str() of a KeyError quotes its text
            text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            msg = " ".join(text.splitlines())
            raise UserError(msg if target in msg else f"{target}: {msg}") from e
        finally:
            if hasattr(obj, "close"):
                obj.close()
        for note in report.meta.get("notes", []):
            print(f"{label}: {note}", file=sys.stderr)
        reports[label] = report

    if len(reports) == 1:
        print(next(iter(reports.values())).to_markdown())
    else:
        print(alpha_table(reports))
        print()
        for (label, rep), target in zip(reports.items(), targets):
            print(f"- {label}: {target} ({rep.meta['source'].split(' ')[0]}), {len(rep)} layers", end="")
            print(f", skipped {len(rep.skipped)}" if rep.skipped else "")
    if args.csv:
        try:
            print(f"wrote {_write_csv(reports, args.csv)}", file=sys.stderr)
        except OSError as e:
            raise UserError(f"cannot write --csv {args.csv!r}: {e.strerror or e}") from e
    if args.plot:
        try:
            from .plots import plot_layer_alpha

            print(f"wrote {plot_layer_alpha(reports, args.plot)}", file=sys.stderr)
        except ImportError as e:
            raise UserError(str(e)) from e
        except OSError as e:
            raise UserError(f"cannot write --plot {args.plot!r}: {e.strerror or e}") from e
    return 0
