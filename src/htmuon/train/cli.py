"""``htmuon train``: one training run from a preset, a config file and/or flags.

    htmuon train --preset quick --optimizer htmuon --seed 1
    htmuon train --config run.toml --steps 1000 --out-dir runs/mine
    htmuon train --out-dir runs/mine --resume        # continue a killed run exactly

Every config key (``htmuon.train.config.TrainConfig``) is a flag: ``lr`` -> ``--lr``,
``weight_decay`` -> ``--weight-decay``, a boolean ``tensorboard`` -> ``--tensorboard`` /
``--no-tensorboard``; its ``--help`` text is the field's. Precedence: defaults < --preset <
--config < flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields


def _metavar(name: str) -> str:
    from htmuon.train.config import _base_type

    typ, _ = _base_type(name)
    return {int: "INT", float: "FLOAT"}.get(typ, "STR")


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per ``TrainConfig`` field, its help from the field's ``metadata["help"]``.

    Values stay strings here (``config.coerce`` converts and checks them, with the same one-line
    errors as for config files); a boolean key is a switch pair ``--key`` / ``--no-key``.
    """
    from htmuon.train.config import TrainConfig, _base_type

    group = parser.add_argument_group("config keys (override the preset and --config file)")
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        help_text = f"{f.metadata['help']} [default: {f.default}]".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if _base_type(f.name)[0] is bool:
            group.add_argument(
                flag,
                dest=f.name,
                default=argparse.SUPPRESS,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            group.add_argument(
                flag, dest=f.name, default=argparse.SUPPRESS, metavar=_metavar(f.name), help=help_text
            )


def config_overrides(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict[str, str | bool]:
    from htmuon.train.config import TrainConfig

    return {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if f.name not in exclude and hasattr(args, f.name)
    }


#: config keys that only the HTMuon family (one ``htmuon.HTMuon``) reads: AdamW and the baselines
#: from other libraries ignore them
HTMUON_ONLY_KEYS = ("p", "method", "spectrum", "scale", "interval", "momentum")
#: baselines whose betas are their own (SOAP, GaLore): ``--adamw-beta1/2`` would be ignored
OWN_BETAS = ("soap", "galore")


def check_used_keys(optimizer: str, keys, where: str = "", flags: bool = False) -> None:
    """Refuse keys given explicitly (flags, a compare spec's overrides) that ``optimizer`` would ignore:
    the HTMuon family's options for AdamW and the other baselines, ``adamw_lr`` for those with no AdamW
    part. An unknown optimizer name is left to its own check."""
    from htmuon.cli import UserError
    from htmuon.train.optimizers import HTMUON_NAMES, NO_ADAMW_PART, OPTIMIZERS

    if optimizer not in OPTIMIZERS:
        return
    family = optimizer in HTMUON_NAMES
    unused = [
        k
        for k in keys
        if (k in HTMUON_ONLY_KEYS and not family)
        or (k == "adamw_lr" and optimizer in NO_ADAMW_PART)
        or (k in ("adamw_beta1", "adamw_beta2") and optimizer in OWN_BETAS)
    ]
    if unused:
        what = ", ".join("--" + k.replace("_", "-") if flags else k for k in unused)
        if unused == ["adamw_lr"]:
            why = "one lr trains every parameter"
        elif set(unused) <= {"adamw_beta1", "adamw_beta2"}:
            why = "its betas are its own"
        else:
            why = "not of the HTMuon family"
        raise UserError(f"{where}{what}: optimizer '{optimizer}' does not use it ({why})")


def note_ignored_file_keys(cfg, file: str) -> None:
    """Say which HTMuon-family keys the config ``file`` sets, away from their defaults, that ``cfg``'s
    optimizer (AdamW, a baseline) ignores: a note, not an error, since a run's saved ``config.json``
    holds every key and is a config file too (an HTMuon run's, reused with ``--optimizer adamw``)."""
    from htmuon.train.config import TrainConfig, read_config_file
    from htmuon.train.optimizers import HTMUON_NAMES, OPTIMIZERS

    if cfg.optimizer not in OPTIMIZERS or cfg.optimizer in HTMUON_NAMES:
        return
    given, default = read_config_file(file), TrainConfig()
    ignored = [k for k in HTMUON_ONLY_KEYS if k in given and getattr(cfg, k) != getattr(default, k)]
    if ignored and os.environ.get("RANK", "0") == "0":
        what = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in ignored)
        print(
            f"htmuon: note: {what} in '{file}': optimizer '{cfg.optimizer}' does not use it (not of the "
            "HTMuon family): ignored",
            file=sys.stderr,
            flush=True,
        )


def get_preset(name: str | None):
    from htmuon.cli import UserError
    from htmuon.train.presets import RUN_PRESETS

    if name is None:
        return None
    if name not in RUN_PRESETS:
        raise UserError(f"unknown preset '{name}' (choose from {', '.join(RUN_PRESETS)})")
    return RUN_PRESETS[name]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", help="a run preset: quick, quick-seeds, smoke, gpu-60m, digits, cifar10, ..."
    )
    parser.add_argument("--config", metavar="FILE", help="a JSON or TOML file of config keys")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir from its checkpoint"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help="checkpoint after STEP and exit (resume later with --resume)",
    )
    parser.add_argument("--list-presets", action="store_true", help="list the run and model presets and exit")
    add_config_flags(parser)


def list_presets() -> None:
    from htmuon.train.presets import MODEL_PRESETS, RUN_PRESETS

    print("run presets (--preset):")
    width = max(map(len, RUN_PRESETS))  # every description starts in one column
    for name, p in RUN_PRESETS.items():
        print(f"  {name:{width}s}  {p.description}")
    print("model presets (--model): " + ", ".join(MODEL_PRESETS))


def main(args: argparse.Namespace) -> int:
    from htmuon.cli import UserError
    from htmuon.train.config import make_config
    from htmuon.train.loop import train

    if args.list_presets:
        list_presets()
        return 0
    preset = get_preset(args.preset)
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after must be >= 1, got {args.stop_after}")
    overrides = config_overrides(args)
    cfg = make_config(preset.config if preset else None, args.config, overrides, strings=True)
    check_used_keys(cfg.optimizer, [k for k in overrides if k != "optimizer"], flags=True)
    if args.config:
        note_ignored_file_keys(cfg, args.config)
    summary = train(
        cfg,
        resume="required" if args.resume else False,  # --resume of a folder without a run: an error
        stop_after=args.stop_after,
        preset_lrs=preset.lrs if preset else None,
        preset_adamw_lrs=preset.adamw_lrs if preset else None,
        argv=sys.argv,
    )
    from htmuon import torchrun
    from htmuon.errors import Interrupted, signal_exit_code

    rank = torchrun.finish()
    if summary["stopped"] and summary.get("signal"):  # every rank ends with the signal's exit code
        code = signal_exit_code(summary["signal"])
        if rank != 0:
            return code
        raise Interrupted(
            f"stopped by {summary['signal']} after step {summary['steps_done']}, with a checkpoint; "
            f"continue with --resume --out-dir {summary['run_dir']}",
            code,
        )
    if rank != 0:  # under torchrun: rank 0 reports
        return 0
    if summary["stopped"]:
        print(
            f"stopped after step {summary['steps_done']}; "
            f"continue with --resume --out-dir {summary['run_dir']}"
        )
        return 0
    if summary["diverged"]:
        print(
            f"diverged ({summary.get('diverged_why', 'non-finite loss')}) at step {summary['steps_done']}: "
            f"{summary['run_dir']}",
            file=sys.stderr,
        )
        return 1
    metric = (
        f"val ppl {summary['final_val_ppl']:.3f}"
        if summary.get("final_val_ppl") is not None
        else f"val acc {summary['final_val_acc']:.4f}"
    )
    alpha = f", mean alpha {summary['mean_alpha']:.3f}" if summary.get("mean_alpha") is not None else ""
    ms = summary.get("ms_per_step")  # None after one step (the first, warm-up step is not timed)
    print(
        f"done: {summary['optimizer']} lr {summary['lr']:g} seed {summary['seed']}: "
        f"val loss {summary['final_val_loss']:.4f}, {metric}{alpha}"
        + ("" if ms is None else f", {ms:.1f} ms/step")
        + f" -> {summary['run_dir']}"
    )
    return 0
