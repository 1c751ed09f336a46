"""``htmuon compare``: a grid of optimizers x seeds x learning rates, tuned fairly, and its report.

    htmuon compare --preset quick                       # AdamW, Muon, HTMuon; 1 seed
    htmuon compare --preset quick --seeds 0,1,2 --optimizers muon,htmuon,htmuon:method=ns
    htmuon compare --preset quick --lr-grid muon=0.005,0.01,0.02 htmuon=0.04,0.08,0.16 \
        --adamw-lr-grid muon=1e-3,3e-3,1e-2 htmuon=1e-3,3e-3,1e-2 --tune-seeds 100 --seeds 0,1,2 \
        --extend-edges 2

An optimizer spec is a name (``htmuon.train.optimizers.OPTIMIZERS``) with optional config
overrides, ``name:key=value,key=value`` (e.g. ``htmuon:method=ns,p=0.25``). Every cell is an
ordinary ``htmuon train`` run in OUT/SPEC/lrLR[-alrLR]/seedSEED; a finished cell is reused and
a killed one resumed, so re-running the same command continues the grid. A cell is locked
(``cell.lock``, O_EXCL, holding the pid) while it runs, so two ``compare`` processes on one
folder share the grid instead of running a cell twice; a lock left by a dead process is taken over.
``--status`` trains nothing: it lists the cells the command would run so far with each one's state
(done, running, stopped at step N, not started, or refused: its folder holds a run of another config,
on which the command would stop with an error) and the time left.

The protocol:

- the grid is the matrix lr (``--lr-grid``; AdamW's own lr for ``adamw``) x the AdamW-part lr
  (``--adamw-lr-grid``, the Muon family only: embeddings, head, norms under routing "standard");
- the best cell per optimizer is the lowest mean final validation loss (highest accuracy for
  image models; between equal ones, the smaller matrix lr, then the smaller AdamW-part lr) over the
  *selection* seeds: ``--tune-seeds`` when given, and the best cell is then
  re-run on ``--seeds`` for the reported numbers; without ``--tune-seeds`` selection and report
  share the seeds, and the report says so;
- a best value at the edge of what was tried is flagged in the table; ``--extend-edges N`` adds
  up to N values beyond such an edge (the grid's own ratio) and runs them, on the selection seeds;
- seeds are paired across optimizers (same initialisation and batches), so the report gives the
  per-seed differences to Muon, mean ± std;
- a learning rate not tuned by this grid (the preset's or the optimizer's default) is said to
  be so, with a warning when the preset's lr was tuned at another steps/routing/model.

Writes OUT/results.md (the tables and notes), OUT/results.json, OUT/val_curves.png,
OUT/lr_grid.png (loss against each lr tried, Fig. 12 style), OUT/p_grid.png (loss against p
when the specs differ in p, Fig. 8 style) and, when ``htmuon.diagnostics`` is available,
OUT/alpha.png (layer-wise alpha per optimizer) and, for runs with ``--alpha-every N``,
OUT/alpha_curves.png (mean alpha over training).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from htmuon.train.locks import acquire_lock, describe_owner, lock_holder, release_lock

GRID_FIELDS = ("optimizer", "seed", "lr", "out_dir")
#: the warmup, as a step count or a fraction of the steps: one setting
WARMUP_KEYS = frozenset({"warmup_steps", "warmup_fraction"})
LOCK_NAME = "cell.lock"
#: how long a compare process waits between looks at cells another process holds
LOCK_POLL_S = 5.0


def configure(parser: argparse.ArgumentParser) -> None:
    from htmuon.train.cli import add_config_flags

    parser.add_argument(
        "--preset", help="a run preset (quick, quick-seeds, quick-lr, smoke, digits, gpu-60m, ...)"
    )
    parser.add_argument("--config", metavar="FILE", help="a JSON or TOML file of config keys for every run")
    parser.add_argument(
        "--optimizers",
        metavar="SPECS",
        help="comma-separated optimizer specs, e.g. adamw,muon,htmuon:method=ns",
    )
    parser.add_argument("--seeds", metavar="LIST", help="comma-separated seeds reported, e.g. 0,1,2")
    parser.add_argument(
        "--tune-seeds",
        metavar="LIST",
        help="seeds the lr grid is run and selected on (not reported); the best cell then runs on --seeds",
    )
    parser.add_argument(
        "--lr-grid",
        nargs="+",
        metavar="NAME=LR,LR",
        help="matrix lrs (adamw: its lr) per optimizer name or spec, e.g. muon=0.01,0.02 htmuon=0.02,0.04 "
        "htmuon:p=0.25=0.08,0.16 (a spec's own grid wins over its name's)",
    )
    parser.add_argument(
        "--adamw-lr-grid",
        nargs="+",
        metavar="NAME=LR,LR",
        help="AdamW-part lrs per Muon-family name or spec, e.g. muon=1e-3,3e-3 htmuon=1e-3,3e-3",
    )
    parser.add_argument(
        "--extend-edges",
        type=int,
        default=0,
        metavar="N",
        help="up to N rounds adding an lr beyond a best value at the edge of its grid [default: 0]",
    )
    parser.add_argument(
        "--models",
        metavar="LIST",
        help="a size scan: the whole protocol once per model preset in OUT/MODEL, then gap_vs_params.png",
    )
    parser.add_argument(
        "--carry-lrs",
        nargs="?",
        const="3",
        default="0",
        metavar="N",
        help="with --models: each model after the first tunes every optimizer's matrix lr on N values "
        "2^j x its best on the model before (N=3: 1/2, 1, 2; N=1: that lr alone, no selection runs) and "
        "the AdamW-part lr on the values the optimizers chose there (a cheaper scan); a list such as 3,1 "
        "gives one N per step between consecutive models [N default: 3]",
    )
    parser.add_argument(
        "--out-dir",
        dest="compare_out",
        metavar="DIR",
        help="grid folder [default: runs/compare-PRESET, or runs/compare-custom without --preset]",
    )
    parser.add_argument("--no-plots", action="store_true", help="write the table only")
    parser.add_argument("--list-presets", action="store_true", help="list the run and model presets and exit")
    parser.add_argument(
        "--status",
        action="store_true",
        help="train nothing: list every cell of the command so far (done, running, stopped at step N, "
        "not started, refused: a run of another config) with its last validation loss and the time left",
    )
    add_config_flags(parser, exclude=GRID_FIELDS)


# ----------------------------------------------------------------------------- the grid


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    from htmuon.cli import UserError
    from htmuon.train.cli import check_used_keys
    from htmuon.train.config import coerce
    from htmuon.train.optimizers import check_optimizer_name

    name, _, rest = spec.partition(":")
    check_optimizer_name(name)
    overrides: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"optimizer spec '{spec}': expected key=value, got '{item}'")
        key = key.strip().replace("-", "_")
        if key in ("optimizer", "seed", "out_dir"):
            raise UserError(f"optimizer spec '{spec}': '{key}' cannot be set per optimizer")
        if key in overrides:  # the first value would be dropped silently (and the folder names both)
            raise UserError(f"optimizer spec '{spec}' sets '{key}' twice")
        coerce(key, value, from_string=True, where=f" in optimizer spec '{spec}'")
        overrides[key] = value.strip()
    check_used_keys(name, overrides, f"optimizer spec '{spec}' sets ")
    return name, overrides


def with_spec(base: dict[str, str], spec_over: dict[str, str]) -> dict[str, str]:
    """The command's config flags with a spec's own options over them; a spec's warmup (either key)
    replaces the command's (both keys given there would be refused as given together)."""
    if WARMUP_KEYS & spec_over.keys():
        base = {k: v for k, v in base.items() if k not in WARMUP_KEYS}
    return {**base, **spec_over}


def parse_list(text: str, kind, what: str) -> list:
    from htmuon.cli import UserError

    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        numbers = "integers" if kind is int else "numbers"
        raise UserError(f"{what} must be a comma-separated list of {numbers}, got '{text}'") from None
    if not items:
        raise UserError(f"{what} is empty")
    return items


def parse_lr_grid(items: list[str] | None, flag: str = "--lr-grid") -> dict[str, list[float]]:
    from htmuon.cli import UserError

    out: dict[str, list[float]] = {}
    for item in items or []:
        # the last '=': a spec key has its own ('htmuon:p=0.25=0.08,0.16'), the lr list has none
        key, eq, values = item.rpartition("=")
        if not eq:
            raise UserError(f"{flag} expects NAME=LR,LR..., got '{item}'")
        lrs = parse_list(values, float, f"{flag} {key}")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise UserError(f"{flag} {key}: learning rates must be > 0, got '{values}'")
        if key in out:  # one of the two lists would be dropped silently
            raise UserError(f"{flag} gives '{key}' twice: put all its lrs in one list, {key}=LR,LR,...")
        out[key] = sorted(set(lrs))
    return out


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec.replace(":", "__"))


def split_specs(text: str) -> list[str]:
    """Comma-separated specs; a spec's own overrides contain commas ("name:k=v,k=v") and are re-joined."""
    joined: list[str] = []
    for s in (s.strip() for s in text.split(",")):
        if not s:
            continue
        if joined and "=" in s and ":" not in s and ":" in joined[-1]:
            joined[-1] += "," + s
        else:
            joined.append(s)
    return joined


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: an optimizer spec at (lr, AdamW-part lr) and a seed."""

    spec: str
    lr: float
    adamw_lr: float | None  # None for adamw (it has no separate AdamW part)
    seed: int
    cfg: object  # the resolved TrainConfig, out_dir set
    phase: str  # "select" (the lr grid) or "report" (the best cell on the reported seeds)


@dataclasses.dataclass
class Plan:
    """What a ``compare`` command runs: specs, seeds, lr grids, and how to build a cell."""

    specs: list[str]
    seeds: list[int]
    tune_seeds: list[int] | None
    lrs: dict[str, list[float | None]]  # None: not gridded (the spec's/preset's/default lr)
    adamw_lrs: dict[str, list[float | None]]  # None: the config's adamw_lr; absent for adamw
    out: Path
    name: str
    preset: object
    base_overrides: dict[str, str]
    config_file: str | None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def select_seeds(self) -> list[int]:
        return self.tune_seeds if self.tune_seeds else self.seeds

    def cell(self, spec: str, lr: float | None, adamw_lr: float | None, seed: int, phase: str) -> Cell:
        from htmuon.train.config import make_config
        from htmuon.train.loop import resolve_config
        from htmuon.train.optimizers import NO_ADAMW_PART

        opt_name, spec_over = parse_spec(spec)
        over = {**with_spec(self.base_overrides, spec_over), "optimizer": opt_name, "seed": str(seed)}
        if lr is not None:
            over["lr"] = repr(lr)
        if adamw_lr is not None:
            over["adamw_lr"] = repr(adamw_lr)
        preset = self.preset
        cfg = make_config(preset.config if preset else None, self.config_file, over, strings=True)
        cfg = resolve_config(cfg, preset.lrs if preset else None, preset.adamw_lrs if preset else None)
        alr = None if opt_name in NO_ADAMW_PART else cfg.adamw_lr
        leaf = f"lr{cfg.lr:g}" + ("" if alr is None else f"-alr{alr:g}")
        run_dir = self.out / safe_name(spec) / leaf / f"seed{seed}"
        return Cell(spec, cfg.lr, alr, seed, dataclasses.replace(cfg, out_dir=str(run_dir)), phase)

    def select_cells(self) -> list[Cell]:
        """Seed by seed (every spec's cells of a seed before the next seed), so that a grid cut short,
        or split between processes, has its seeds paired across the optimizers."""
        return [
            self.cell(spec, lr, alr, seed, "select")
            for seed in self.select_seeds
            for spec in self.specs
            for lr in self.lrs[spec]
            for alr in self.adamw_lrs.get(spec, [None])
        ]


def grid_folder(args: argparse.Namespace, name: str) -> Path:
    """The grid's folder: ``--out-dir``, or runs/compare-NAME when it is left out. A blank ``--out-dir``
    (an unset shell variable) is refused, as ``htmuon train`` refuses a blank ``out_dir``: it fell back
    to runs/compare-NAME without a word."""
    from htmuon.cli import UserError

    given = getattr(args, "compare_out", None)
    if given is not None and not given.strip():
        raise UserError(
            f"--out-dir must be a folder, not blank (a blank path is the current folder; leave it out for "
            f"runs/compare-{name}), got {given!r}"
        )
    return Path(given or f"runs/compare-{name}").expanduser()


def plan_grid(args: argparse.Namespace) -> Plan:
    """The Plan for a command line: specs, seeds, grids; notes on what the grid does not tune."""
    from htmuon.cli import UserError
    from htmuon.train.cli import config_overrides, get_preset
    from htmuon.train.optimizers import NO_ADAMW_PART

    preset = get_preset(args.preset)
    for flag in ("optimizers", "seeds", "tune_seeds"):  # given, but empty: not "the preset's"
        value = getattr(args, flag, None)
        if value is not None and not str(value).strip(" ,"):
            raise UserError(
                f"--{flag.replace('_', '-')} is empty: give a comma-separated list, or leave it out"
            )
    if preset is None and not args.optimizers:
        raise UserError("give --preset (e.g. quick) or --optimizers")
    if args.config:  # the cell sets these: a file's value would be ignored, or (lr) given to every optimizer
        from htmuon.train.config import read_config_file

        grid_keys = [k for k in read_config_file(args.config) if str(k).replace("-", "_") in GRID_FIELDS]
        if grid_keys:
            raise UserError(
                f"config file '{args.config}' sets {', '.join(map(repr, grid_keys))}, which compare sets per "
                "cell: give the optimizers with --optimizers, their lrs with --lr-grid NAME=LR,... (or a "
                "spec 'NAME:lr=LR'), the seeds with --seeds and the folder with --out-dir"
            )
    specs = split_specs(args.optimizers) if args.optimizers else list(preset.optimizers)
    if len(set(specs)) != len(specs):
        raise UserError(f"--optimizers lists a spec twice: {','.join(specs)}")
    seeds = parse_list(args.seeds, int, "--seeds") if args.seeds else list(preset.seeds if preset else (0,))
    tune_seeds = (
        parse_list(args.tune_seeds, int, "--tune-seeds") if getattr(args, "tune_seeds", None) else None
    )
    for flag, values in (("--seeds", seeds), ("--tune-seeds", tune_seeds or [])):
        if len(set(values)) != len(values):
            raise UserError(
                f"{flag} {','.join(map(str, values))} lists a seed twice: a repeated seed is the same run, "
                "not another sample"
            )
    if tune_seeds and set(tune_seeds) & set(seeds):
        raise UserError(
            f"--tune-seeds {args.tune_seeds} and --seeds {','.join(map(str, seeds))} overlap: "
            "selection seeds must not be reported"
        )
    extend = getattr(args, "extend_edges", 0) or 0
    if extend < 0:
        raise UserError(f"--extend-edges must be >= 0, got {extend}")
    given = parse_lr_grid(args.lr_grid)
    # the preset's grids for optimizers not run are ignored; a grid the command line names must match one
    grid = {k: list(v) for k, v in (preset.lr_grid.items() if preset else [])}
    grid.update(given)
    agrid = parse_lr_grid(getattr(args, "adamw_lr_grid", None), "--adamw-lr-grid")
    name = args.preset or "custom"
    out = grid_folder(args, name)
    plan = Plan(
        specs, seeds, tune_seeds, {}, {}, out, name, preset,
        config_overrides(args, exclude=GRID_FIELDS), args.config,
    )  # fmt: skip
    for key in [*given, *agrid]:
        if key not in specs and key not in {parse_spec(s)[0] for s in specs}:
            raise UserError(f"lr grid for '{key}', which is not among the optimizers ({','.join(specs)})")
    used: dict[str, set[str]] = {"lr": set(), "adamw_lr": set()}  # the grid keys some spec takes
    for spec in specs:
        opt_name, spec_over = parse_spec(spec)
        for key, g in (("lr", grid), ("adamw_lr", agrid)):
            if key not in spec_over:
                used[key].add(spec if spec in g else opt_name)
        lrs = grid.get(spec) or grid.get(opt_name)
        if "lr" in spec_over:
            lrs = None
        plan.lrs[spec] = list(lrs) if lrs else [None]
        alrs = agrid.get(spec) or agrid.get(opt_name)
        if opt_name in NO_ADAMW_PART:
            if alrs:
                raise UserError(
                    f"{opt_name} has no AdamW part (one lr trains every parameter): "
                    f"tune its lr with --lr-grid {opt_name}=..."
                )
        else:
            plan.adamw_lrs[spec] = list(alrs) if alrs and "adamw_lr" not in spec_over else [None]
    for flag, key, g in (("--lr-grid", "lr", given), ("--adamw-lr-grid", "adamw_lr", agrid)):
        for name in g:
            if name not in used[key]:  # every spec it names sets that lr itself, or has its own grid
                why = [
                    f"'{s}' sets {key} in the spec" if key in parse_spec(s)[1] else f"'{s}' has its own grid"
                    for s in specs
                    if s == name or parse_spec(s)[0] == name
                ]
                raise UserError(f"{flag} {name}=...: no optimizer runs it ({'; '.join(why)})")
    _check_flags_used(plan, agrid)
    plan.notes = untuned_notes(plan)
    if getattr(args, "carry_note", None):
        plan.notes.insert(0, args.carry_note)
    extend_note = f" (up to {extend} round(s) of extension at a grid edge)" if extend else ""
    if plan.tune_seeds:
        plan.notes.insert(
            0,
            f"lrs selected on seeds {_seeds(plan.tune_seeds)}{extend_note}; the reported numbers are the "
            f"best cells re-run on seeds {_seeds(seeds)} (not used for selection).",
        )
    elif any(len(v) > 1 for v in [*plan.lrs.values(), *plan.adamw_lrs.values()]):
        plan.notes.insert(
            0,
            f"selection and report share seeds {_seeds(seeds)}{extend_note}: the best cell's mean is "
            "optimistic (pass --tune-seeds for selection on separate seeds).",
        )
    return plan


def _check_flags_used(plan: Plan, agrid: dict[str, list[float]]) -> None:
    """Refuse a config flag that no cell would use, as ``htmuon train`` refuses it for its one optimizer:
    an HTMuon-family option (``--p``, ``--method``, ...) or ``--adamw-lr`` / ``--adamw-beta1/2`` when
    every spec's optimizer ignores it (``check_used_keys``), sets the key in the spec, or (``--adamw-lr``)
    has an ``--adamw-lr-grid``, whose values the cells take instead. (Before, each cell dropped it.)"""
    from htmuon.cli import UserError
    from htmuon.train.cli import check_used_keys

    for key in plan.base_overrides:
        why = []
        for spec in plan.specs:
            opt_name, spec_over = parse_spec(spec)
            try:
                check_used_keys(opt_name, [key])
            except UserError as e:
                why.append(f"'{spec}' does not use it {str(e).rpartition(' does not use it ')[2]}")
                continue
            if key in spec_over:
                why.append(f"'{spec}' sets {key} in the spec")
            elif key == "adamw_lr" and (agrid.get(spec) or agrid.get(opt_name)):
                why.append(f"'{spec}' has an --adamw-lr-grid")
            else:
                break  # this spec's cells use it
        else:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag}: no optimizer of this grid uses it ({'; '.join(why)})")


def _seeds(seeds) -> str:
    return ",".join(map(str, seeds))


#: Spec options that change the update itself: a preset lr tuned for the optimizer's own values of
#: these is flagged when a spec sets them (``method`` is not here: the backends approximate one map).
_UPDATE_OPTIONS = ("p", "spectrum", "scale", "interval", "plugin", "lr_adjust", "momentum")


def _preset_lr_note(
    spec: str, cfg, tuned: dict, key: str, carried: bool = False, spec_over: dict | None = None
) -> str:
    """The note for an lr (``key``: "lr" or "adamw_lr") taken from the preset: where it was tuned (or
    that it was carried from another optimizer, never tuned for this one), and a warning naming each
    setting of this run that differs from there, and each update option the spec itself sets."""
    at = {k: v for k, v in tuned.items() if k != key}
    where = ", ".join(f"{k}={v!r}" for k, v in at.items()) or "an unrecorded setting"
    differ = [f"{k}={getattr(cfg, k)!r} (tuned at {v!r})" for k, v in at.items() if getattr(cfg, k) != v]
    differ += [f"{k}={v} set in the spec" for k, v in (spec_over or {}).items() if k in _UPDATE_OPTIONS]
    what = "lr" if key == "lr" else "AdamW-part lr"
    origin = (
        f"carried from another optimizer's value tuned at {where}, never tuned for this one"
        if carried
        else f"tuned at {where}"
    )
    line = f"{spec}: {what} {getattr(cfg, key):g} is the preset's, {origin}; not tuned here"
    if differ:
        flag = "--lr-grid" if key == "lr" else "--adamw-lr-grid"
        line += f". WARNING: reused under {', '.join(differ)}: re-tune with {flag}"
    return line + "."


def untuned_notes(plan: Plan) -> list[str]:
    """One line per spec whose lr (or AdamW-part lr) this grid does not tune, saying where it comes from."""
    from htmuon.train.optimizers import DEFAULT_ADAMW_LR, NO_ADAMW_PART, OPTIMIZERS

    notes = []
    preset = plan.preset
    tuned_at = dict(getattr(preset, "tuned_at", None) or {})
    preset_lrs = getattr(preset, "lrs", None) or {}
    preset_alrs = getattr(preset, "adamw_lrs", None) or {}
    carried = getattr(preset, "carried", frozenset())
    for spec in plan.specs:
        opt_name, spec_over = parse_spec(spec)
        cell = plan.cell(
            spec, plan.lrs[spec][0], plan.adamw_lrs.get(spec, [None])[0], plan.select_seeds[0], ""
        )
        cfg = cell.cfg
        # where this optimizer's preset lrs were tuned (its own AdamW-part lr, if the preset has one;
        # none for an optimizer without an AdamW part, nor when this grid tunes the AdamW-part lr)
        tuned = {**tuned_at, **({"adamw_lr": preset_alrs[opt_name]} if opt_name in preset_alrs else {})}
        if opt_name in NO_ADAMW_PART or len(plan.adamw_lrs.get(spec, [None])) > 1:
            tuned.pop("adamw_lr", None)

        if plan.lrs[spec] == [None]:
            if "lr" in spec_over:
                notes.append(f"{spec}: lr {cfg.lr:g} set in the spec, not tuned here.")
            elif "lr" in plan.base_overrides:
                notes.append(f"{spec}: lr {cfg.lr:g} from --lr, not tuned here.")
            elif opt_name in preset_lrs:
                notes.append(_preset_lr_note(spec, cfg, tuned, "lr", (opt_name, "lr") in carried, spec_over))
            else:
                notes.append(
                    f"{spec}: lr {OPTIMIZERS[opt_name]['lr']:g} is the optimizer's default, never tuned."
                )
        if opt_name not in NO_ADAMW_PART and plan.adamw_lrs[spec] == [None]:
            given = "adamw_lr" in spec_over or "adamw_lr" in plan.base_overrides
            if not given and opt_name in preset_alrs and cfg.adamw_lr == preset_alrs[opt_name]:
                notes.append(
                    _preset_lr_note(
                        spec, cfg, tuned, "adamw_lr", (opt_name, "adamw_lr") in carried, spec_over
                    )
                )
            else:
                source = "" if given or cfg.adamw_lr != DEFAULT_ADAMW_LR else " (the default)"
                notes.append(
                    f"{spec}: AdamW-part lr {cfg.adamw_lr:g}{source} fixed, not tuned "
                    f"(--adamw-lr-grid {opt_name}=...)."
                )
    return notes


# ----------------------------------------------------------------------------- running


def run_cells(
    cells: list[Cell], preset, quiet: bool = False, poll_s: float = LOCK_POLL_S, label: str = ""
) -> list[dict]:
    """Train (or reuse) every cell; a cell locked by another live process is waited for, not run twice.

    ``label`` names the batch in the progress lines (``[report 2/6]``): ``run_plan`` runs the grid, each
    round of edge extensions and the report cells as batches, each counted from 1."""
    from htmuon.train.loop import train

    done: dict[int, dict] = {}
    pending = list(range(len(cells)))
    while pending:
        waiting = []
        for i in pending:
            c = cells[i]
            run_dir = Path(c.cfg.out_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = run_dir / LOCK_NAME
            if not acquire_lock(lock):
                waiting.append(i)
                continue
            try:
                st = cell_state(c)  # (under the lock: nothing else writes the folder now)
                if st["state"] == "refused":  # as the run would refuse it, with what to do
                    raise _refused(c, st["why"])
                if not quiet:
                    alr = "" if c.adamw_lr is None else f" adamw_lr={c.adamw_lr:g}"
                    # a finished cell is not trained again: say so, or a re-run's lines read as training
                    reused = {"done": "finished", "diverged": "diverged"}.get(st["state"])
                    print(
                        f"[{label + ' ' if label else ''}{len(done) + 1}/{len(cells)}] "
                        f"{c.spec} lr={c.lr:g}{alr} seed={c.seed} "
                        f"-> {run_dir}{f' ({reused} earlier: reused)' if reused else ''}",
                        file=sys.stderr,
                        flush=True,
                    )
                s = train(c.cfg, resume=True)  # (c.cfg is resolved: the preset's lrs are in it)
            finally:
                release_lock(lock)
            if s.get("signal"):  # SIGTERM / Ctrl-C: the cell has its checkpoint; no next cell
                from htmuon.errors import Interrupted, signal_exit_code

                state = (
                    f"stopped after step {s['steps_done']}"
                    if s["stopped"]
                    else f"diverged at step {s['steps_done']}"
                    if s["diverged"]
                    else "finished its run"
                )
                raise Interrupted(
                    f"stopped by {s['signal']}: the cell {c.spec} lr={c.lr:g} seed={c.seed} {state} "
                    f"(checkpoint in {run_dir}); run the same command again to go on",
                    signal_exit_code(s["signal"]),
                )
            if s.get("mean_alpha") is None and s["finished"] and c.cfg.alpha and _has_diagnostics():
                # a run finished before diagnostics existed (or while they were not installed)
                s["mean_alpha"] = final_mean_alpha(run_dir, s.get("steps_done"))
                if s["mean_alpha"] is None:  # its checkpoint deleted, no alpha logged: the report says so
                    s["mean_alpha_missing"] = True
            done[i] = cell_record(c, s)
        if waiting and len(waiting) == len(pending):
            if not quiet:
                held = describe_owner(Path(cells[waiting[0]].cfg.out_dir) / LOCK_NAME)
                more = f" and {len(waiting) - 1} more" if len(waiting) > 1 else ""
                print(
                    f"waiting for {len(waiting)} cell(s) another process runs: {held}{more}",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(poll_s)
        pending = waiting
    return [done[i] for i in range(len(cells))]


def cell_record(c: Cell, summary: dict) -> dict:
    """A cell's row for :func:`aggregate`: its run's summary and the grid's view of it."""
    # the cell's folder, not the one its summary.json recorded (a folder moved after the run)
    rec = {**summary, "run_dir": str(c.cfg.out_dir), "spec": c.spec, "adamw_lr": c.adamw_lr}
    rec.update(phase=c.phase, p=c.cfg.p, weight_decay=c.cfg.weight_decay, wd_mode=c.cfg.wd_mode)
    return rec


def _next_value(values: list[float], high: bool) -> float:
    """One step beyond the edge of a sorted grid, at the ratio of its two outermost values."""
    if high:
        return float(f"{values[-1] * values[-1] / values[-2]:.3g}")
    return float(f"{values[0] * values[0] / values[1]:.3g}")


def edge_flags(rows: list[dict], best: dict) -> dict[str, str | None]:
    """Per lr dimension of ``best``: "low"/"high" if it is the lowest/highest value tried along its line
    (the other lr held at the best's), "fixed" if only one value was tried, else None."""
    out: dict[str, str | None] = {}
    for dim, other in (("lr", "adamw_lr"), ("adamw_lr", "lr")):
        if best.get(dim) is None:
            continue
        tried = sorted({r[dim] for r in rows if r["spec"] == best["spec"] and r[other] == best[other]})
        if len(tried) == 1:
            out[dim] = "fixed"
        elif best[dim] == tried[0]:
            out[dim] = "low"
        elif best[dim] == tried[-1]:
            out[dim] = "high"
        else:
            out[dim] = None
    return out


def extension_cells(plan: Plan, agg: dict) -> list[Cell]:
    """Cells one step beyond each best value at a low/high edge, on the selection seeds.

    The new values join the values tried, and every pair of the resulting product that was not run
    yet is run, so the grid stays a full product: a new matrix lr with every AdamW-part lr tried,
    and, where both lrs reached an edge in the same round, the two new values together (the
    corner, which is where the best then moves if both were right to extend)."""
    cells = []
    for spec, best in agg["best"].items():
        flags = edge_flags(agg["rows"], best)
        rows = [r for r in agg["rows"] if r["spec"] == spec]
        values = {dim: {r[dim] for r in rows} for dim in ("lr", "adamw_lr")}
        for dim, other in (("lr", "adamw_lr"), ("adamw_lr", "lr")):
            if flags.get(dim) in ("low", "high"):
                tried = sorted({r[dim] for r in rows if r[other] == best[other]})
                values[dim].add(_next_value(tried, flags[dim] == "high"))
        done = {(r["lr"], r["adamw_lr"]) for r in rows}
        for lr in sorted(values["lr"]):
            for alr in sorted(values["adamw_lr"], key=lambda v: v or 0.0):
                if (lr, alr) not in done:
                    cells += [plan.cell(spec, lr, alr, seed, "select") for seed in plan.select_seeds]
    return cells


def run_plan(
    plan: Plan, extend_edges: int = 0, quiet: bool = False, poll_s: float = LOCK_POLL_S, runner=None
) -> dict:
    """Select (grid, edge extensions) then report (best cells on --seeds when --tune-seeds is given).

    ``runner(cells, label=...) -> records`` runs a batch of cells (default :func:`run_cells`; ``label`` names
    the batch in progress lines); ``--status`` passes one that only reads their folders, so that the
    cells it lists are the ones this function runs."""
    if runner is None:
        runner = functools.partial(run_cells, preset=plan.preset, quiet=quiet, poll_s=poll_s)
    select = runner(plan.select_cells(), label="selection" if plan.tune_seeds else "")
    rounds = 0
    for _ in range(extend_edges):
        new = extension_cells(plan, aggregate(select))
        if not new:
            break
        rounds += 1
        select += runner(new, label=f"edge extension {rounds}:")
    if plan.tune_seeds:
        best = aggregate(select)["best"]
        cells = [  # seed by seed, as select_cells
            plan.cell(spec, b["lr"], b["adamw_lr"], seed, "report")
            for seed in plan.seeds
            for spec, b in best.items()
        ]
        report = runner(cells, label="report")
    else:
        report = select
    return {"select": select, "report": report, "extension_rounds": rounds}


# ----------------------------------------------------------------------------- status


class _Undecided(Exception):
    """The status runner met unfinished cells: the cells after them depend on their results."""


def cell_state(c: Cell) -> dict:
    """What a cell's folder says, read without training; its checkpoint is loaded only where the run
    would decide by it and ``config.json`` cannot stand in for it (see :func:`_refusal`).

    ``state``: "done", "diverged", "running" (its lock is held by a live process), "stopped" (a run
    that ``compare`` resumes from its last checkpoint), "refused" (the folder holds a run of another
    config, which the command would stop on, with an error) or "not started"; ``step`` the last step
    logged (a stopped run resumes from its last checkpoint, at most ``ckpt_every`` steps before it);
    ``val_loss`` the final or, before the end, the last validation loss; ``s_per_step`` the median of
    the last 20 logged step times; ``owner`` who holds the lock; ``summary`` the finished run's;
    ``why`` the refusal, in the words of the run's own check."""
    from htmuon.train.locks import lock_is_stale
    from htmuon.train.loop import read_json, read_metrics

    run_dir = Path(c.cfg.out_dir)
    st = dict(cell=c, state="not started", step=0, steps=c.cfg.steps, val_loss=None, s_per_step=None)
    st.update(owner=None, summary=None, why=None)
    why, ckpt_step = _refusal(c)
    if why:
        st.update(state="refused", why=why)
        return st
    # what loop.train reuses: a finished or diverged run's summary beside its config or checkpoint (a
    # summary.json alone is not a run there: the cell would be trained again)
    holds_run = (run_dir / "config.json").is_file() or any(run_dir.glob("ckpt*.pt"))
    if (run_dir / "summary.json").is_file() and holds_run:
        summary = read_json(run_dir / "summary.json", "run summary")
        # beside a checkpoint that was read, as loop.train decides: reused if it is at the last step, or
        # the run diverged after it; else the run resumes from it
        reused = (
            ckpt_step is None
            or ckpt_step >= c.cfg.steps
            or (summary.get("diverged") and summary.get("steps_done", 0) > ckpt_step)
        )
        if reused and (summary.get("finished") or summary.get("diverged")):
            ms = summary.get("ms_per_step")
            st.update(state="diverged" if summary.get("diverged") else "done", summary=summary)
            st.update(step=summary.get("steps_done", c.cfg.steps), val_loss=summary.get("final_val_loss"))
            st.update(s_per_step=ms / 1e3 if ms else None)
            return st
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    train = [r for r in records if r.get("kind") == "train" and "step" in r]
    val = [r for r in records if r.get("kind") == "val" and "loss" in r]
    if train:
        st["step"] = int(train[-1]["step"])
        times = sorted(r["step_ms"] for r in train[-20:] if r.get("step_ms"))
        st["s_per_step"] = times[len(times) // 2] / 1e3 if times else None
    if val:
        st["val_loss"] = val[-1]["loss"]
    for name, who in ((LOCK_NAME, ""), ("run.lock", "htmuon train, ")):  # compare's lock; train's own
        lock = run_dir / name
        if lock.exists() and not lock_is_stale(lock):
            st.update(state="running", owner=who + lock_holder(lock))
            return st
    if records or holds_run:
        st["state"] = "stopped"
    return st


def _refusal(c: Cell) -> tuple[str | None, int | None]:
    """Why training the cell would be refused (None if not): the run in its folder is of another config
    (a run folder's path leaves out ``steps`` and most other keys), or its checkpoints are unusable;
    and the step of the checkpoint the run would resume from, where it was read (else None).

    As ``loop.train`` decides: a folder with a checkpoint is checked (``loop._check_same_run``) on the
    newest usable checkpoint's config, one without on ``config.json``. ``config.json`` stands in for
    the checkpoint (not loaded: it can be large) where it is readable and of this config and ``ckpt.pt``
    is there: written when the run started, and a resume of another config is refused, so its
    checkpoints hold the same config. Otherwise -- no config.json (a checkpoint and a summary were kept,
    or it was deleted), an unreadable one, one of another config (edited since: the run goes on by its
    checkpoint), or only ``ckpt.prev.pt`` left -- the checkpoint is read, as the run reads it."""
    from htmuon.errors import UserError
    from htmuon.train import checkpoint
    from htmuon.train.config import from_dict
    from htmuon.train.loop import _check_same_run, read_json, resolve_config

    run_dir = Path(c.cfg.out_dir)
    path = run_dir / "config.json"
    cfg = resolve_config(c.cfg)  # (train() resolves the config it is given again: the same here)
    ckpts = [run_dir / n for n in (checkpoint.CKPT_NAME, checkpoint.PREV_NAME)]
    has_ckpt = any(p.exists() or p.is_symlink() for p in ckpts)
    folder_why = None  # config.json's refusal, in the words of the folder
    if path.is_file():
        try:
            saved = from_dict(read_json(path, "run config"), where=f" in {path}")
            _check_same_run(saved, cfg, "its folder holds a run of")
        except UserError as e:
            if not has_ckpt:  # what the run reads: its words
                return str(e), None
            folder_why = str(e)
        else:
            if not has_ckpt or ckpts[0].is_file():
                return None, None
    if not has_ckpt:
        return None, None
    try:
        payload, used, _ = checkpoint.load_latest(run_dir)  # (no usable one left: the run's error)
        saved = from_dict(payload["config"], where=f" in checkpoint {used}")
        _check_same_run(saved, cfg, f"checkpoint '{used}' was written by")
    except UserError as e:  # (where config.json says so too, its words: the folder's run)
        return folder_why or str(e), None
    return None, payload["step"]


def _refused(c: Cell, why: str):
    """The UserError of a cell whose folder holds a run of another config (``why``: :func:`_refusal`'s)."""
    from htmuon.errors import UserError

    what_to_do = "pick another --out-dir, or run the command that made it"
    return UserError(f"cell '{c.cfg.out_dir}': {why}; {what_to_do}")


def _status_runner(states: list[dict], batches: list[int]):
    """A ``run_plan`` runner that reads cells instead of running them; it stops the plan (raises
    :class:`_Undecided`) at the first batch not all finished. ``batches``: each batch's size."""

    def runner(cells: list[Cell], label: str = "") -> list[dict]:
        batch = [cell_state(c) for c in cells]
        states.extend(batch)
        batches.append(len(batch))
        if any(st["summary"] is None for st in batch):
            raise _Undecided
        return [cell_record(st["cell"], st["summary"]) for st in batch]

    return runner


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def plan_status(plan: Plan, extend_edges: int = 0) -> tuple[dict | None, str]:
    """``--status``: every cell ``run_plan`` would run so far, with its state, as text; and the plan's
    result when every cell is finished (None while later cells are undecided)."""
    states: list[dict] = []
    batches: list[int] = []  # the selection grid, each extension round, the report
    try:
        result = run_plan(plan, extend_edges, runner=_status_runner(states, batches))
    except _Undecided:
        result = None
    speeds = [st["s_per_step"] for st in states if st["s_per_step"]]
    typical = statistics.median(speeds) if speeds else None  # for cells not started yet
    # training steps are what the logs time; evaluations and checkpoints come on top: finished cells
    # say how much (wall_s / elapsed_s); without one, the estimate is of the training steps alone
    ratios = [
        st["summary"]["wall_s"] / st["summary"]["elapsed_s"]
        for st in states
        if st["summary"] and st["summary"].get("wall_s") and st["summary"].get("elapsed_s")
    ]
    overhead = statistics.median(ratios) if ratios else 1.0
    lines, counts, left, unknown = [], {}, 0.0, 0
    width = max((len(str(Path(st["cell"].cfg.out_dir).relative_to(plan.out))) for st in states), default=0)
    for st in states:
        c = st["cell"]
        counts[st["state"]] = counts.get(st["state"], 0) + 1
        where = str(Path(c.cfg.out_dir).relative_to(plan.out))
        parts = [st["state"] + (f" ({st['owner']})" if st["owner"] else "")]
        if st["why"]:
            parts[0] += f": {st['why']}"
        elif st["state"] != "not started":
            parts.append(f"step {st['step']}/{st['steps']}")
        if st["val_loss"] is not None:
            parts.append(f"{'final' if st['summary'] else 'last'} val loss {st['val_loss']:.4f}")
        if st["s_per_step"]:
            parts.append(f"{st['s_per_step']:.2f} s/step")
        if st["summary"] is None and st["state"] != "refused":
            speed = st["s_per_step"] or typical
            if speed:
                todo = (st["steps"] - st["step"]) * speed * overhead
                left += todo
                parts.append(f"~{_hours(todo)} left")
            else:
                unknown += 1
        phase = f"[{c.phase}] " if plan.tune_seeds else ""  # without --tune-seeds every cell is reported
        lines.append(f"  {phase}{where:<{width}}  " + ", ".join(parts))
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    head = f"{plan.out}: {len(states)} cell(s) so far ({summary})"
    tail = []
    refused = [st for st in states if st["state"] == "refused"]
    if refused:
        first = Path(refused[0]["cell"].cfg.out_dir).relative_to(plan.out)
        tail.append(
            f"the command would stop with an error at {first}, the first of {len(refused)} refused "
            "cell(s): a folder of another config's run needs another --out-dir, or the command it was made by"
        )
    if result is None:
        if left:
            more = f" (and {unknown} cell(s) of unknown speed)" if unknown else ""
            how = (
                f"evaluations included at {overhead:.2f}x the step time, as in the finished cells"
                if ratios
                else "training steps only: evaluations add to it"
            )
            tail.append(f"~{_hours(left)} of one process left for the cells listed ({how}){more}")
        elif unknown:
            tail.append("time left unknown: no cell listed has logged a step yet")
        rounds_listed = len(batches) - 1  # the batches after the grid (no report cells among them)
        later = ["edge extensions"] if extend_edges > rounds_listed else []
        later += ["the best cells on the reported seeds"] if plan.tune_seeds else []
        if later and not any(st["cell"].phase == "report" for st in states):
            tail.append(f"cells after these ({' and '.join(later)}) are listed once these finish")
    else:
        tail.append("every cell is finished: the command writes (or has written) the report")
    return result, "\n".join([head, *lines, *tail])


def _final_model(run_dir: Path):
    """A finished run's final model, rebuilt from its ``ckpt.pt``; None when the run folder has none (a
    finished cell's checkpoints may be deleted to save disk: its summary is reused). A damaged
    ``ckpt.pt`` is a CheckpointError, as always."""
    from htmuon.train import checkpoint
    from htmuon.train.config import from_dict
    from htmuon.train.loop import build_data_and_model

    path = run_dir / checkpoint.CKPT_NAME
    if not path.exists():
        return None
    ckpt = checkpoint.load(path)
    _, model, _ = build_data_and_model(from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def _has_diagnostics() -> bool:
    try:
        import htmuon.diagnostics  # noqa: F401
    except ImportError:
        return False
    return True


def final_mean_alpha(run_dir: Path, step: int | None = None) -> float | None:
    """Mean layer-wise alpha of a finished run's final model, or None without htmuon.diagnostics.

    Without its ``ckpt.pt`` (deleted after the run) the value metrics.jsonl logged at the final
    ``step`` (runs with ``alpha_every``) is used; None when it logged none there."""
    if not _has_diagnostics():
        return None
    from htmuon.train.loop import mean_alpha, read_metrics

    model = _final_model(run_dir)
    if model is not None:
        return mean_alpha(model)
    metrics = run_dir / "metrics.jsonl"
    logged = [
        r["mean_alpha"]
        for r in (read_metrics(metrics) if metrics.is_file() and step is not None else [])
        if r.get("kind") == "alpha" and r.get("step") == step and r.get("mean_alpha") is not None
    ]
    return logged[-1] if logged else None


# ----------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student's t confidence interval of the mean of ``values`` (independent draws, e.g. paired
    differences over seeds): ``m ± t_((1 + level) / 2, n - 1) s / sqrt(n)``; ``None`` below 2 values.

    Example:
        >>> [round(x, 4) for x in mean_interval([0.0, 0.1, 0.2])]  # t_(0.975, 2) = 4.3027
        [-0.1484, 0.3484]
    """
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t  # scipy comes with the train extra (scikit-learn's dependency)

    m, sd = mean_std(values)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return m - half, m + half


def fmt(m: float | None, s: float | None, digits: int = 3) -> str:
    if m is None:
        return "-"
    if not math.isfinite(m):
        return "diverged"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(summaries: list[dict]) -> dict:
    """Per (spec, lr, AdamW-part lr): mean ± std over seeds; per spec: the best cell on validation."""
    task = "image" if any(s.get("final_val_acc") is not None for s in summaries) else "lm"
    if task == "lm" and summaries and all(s.get("model") for s in summaries):  # every image run diverged
        from htmuon.train.presets import model_task

        if all(model_task(s["model"]) == "image" for s in summaries):
            task = "image"
    cells: dict[tuple, list[dict]] = {}
    for s in summaries:
        cells.setdefault((s["spec"], s["lr"], s.get("adamw_lr")), []).append(s)
    rows = []
    for (spec, lr, alr), runs in cells.items():
        loss = [r["final_val_loss"] for r in runs]
        row = {"spec": spec, "lr": lr, "adamw_lr": alr, "seeds": [r["seed"] for r in runs], "n": len(runs)}
        row["val_loss"] = mean_std(loss)
        row["losses"] = dict(zip(row["seeds"], loss))
        if task == "lm":
            row["val_ppl"] = mean_std(
                [math.exp(min(v, 50.0)) if math.isfinite(v) else math.inf for v in loss]
            )
        else:  # a diverged run has no accuracy: NaN, as its loss is inf (never selected, never paired)
            accs = [r["final_val_acc"] if r["final_val_acc"] is not None else math.nan for r in runs]
            row["val_acc"] = mean_std(accs)
            row["accs"] = dict(zip(row["seeds"], accs))
        ms = [r["ms_per_step"] for r in runs if r.get("ms_per_step")]
        row["ms_per_step"] = mean_std(ms) if ms else (None, None)
        alphas = [r["mean_alpha"] for r in runs if r.get("mean_alpha") is not None]
        row["mean_alpha"] = mean_std(alphas) if alphas else (None, None)
        row["run_dirs"] = [r["run_dir"] for r in runs]
        for key in ("weight_decay", "wd_mode", "p"):
            row[key] = runs[0].get(key)
        backends = sorted({r.get("backend") or "-" for r in runs})
        row["backend"] = " / ".join(backends)  # runs made before backends were recorded: "-"
        rows.append(row)
    best: dict[str, dict] = {}
    for row in rows:
        cur = best.get(row["spec"])
        if cur is None or _selection_key(row, task) < _selection_key(cur, task):
            best[row["spec"]] = row
    return {"task": task, "rows": rows, "best": best}


def _selection_key(row: dict, task: str) -> tuple:
    """Sort key of a cell, best first: finite metric before NaN/inf, then the metric (lowest loss,
    highest accuracy), then, between equal metrics, the smaller matrix lr and the smaller AdamW-part
    lr (the cautious choice; it does not depend on the order the cells were run or read in)."""
    metric = -row["val_acc"][0] if task == "image" else row["val_loss"][0]
    finite = math.isfinite(metric)

    def lr(value: float | None) -> float:
        return math.inf if value is None else value

    return (not finite, metric if finite else 0.0, lr(row["lr"]), lr(row["adamw_lr"]))


def paired_differences(agg: dict, ref: str) -> dict[str, dict]:
    """Per spec: (metric of spec - metric of ``ref``) per shared seed at the best cells, mean ± std,
    the 95% interval of the mean (:func:`mean_interval`) and on how many seeds the spec is worse.

    The metric is the final validation loss (accuracy for image models); seeds are paired: a seed
    gives every optimizer the same initial model and the same batches, so the differences of one
    spec are independent draws, one per seed. A diverged seed (NaN) is left out of the statistics."""
    image = agg["task"] == "image"
    key = "accs" if image else "losses"
    base = agg["best"][ref][key]
    out = {}
    for spec, row in agg["best"].items():
        if spec == ref:
            continue
        seeds = [s for s in row[key] if s in base]
        diffs = {s: row[key][s] - base[s] for s in seeds}
        finite = [d for d in diffs.values() if math.isfinite(d)]
        out[spec] = {
            "per_seed": diffs,
            "mean_std": mean_std(finite) if finite else (None, None),
            "ci95": mean_interval(finite),
            "worse": sum((d < 0) if image else (d > 0) for d in finite),
            "n": len(finite),
        }
    return out


def reference_spec(agg: dict) -> str:
    return "muon" if "muon" in agg["best"] else next(iter(agg["best"]))


def _tried(values) -> str:
    return "/".join(f"{v:g}" for v in sorted(values))


def _flag(flag: str | None) -> str:
    return {"low": " **EDGE (low)**", "high": " **EDGE (high)**", "fixed": " (fixed)"}.get(flag or "", "")


def decay_per_step(row: dict, lr: float | None) -> float | None:
    """The weight decay applied per step at peak lr: lr x wd (torch's convention) or wd ("independent")."""
    wd = row.get("weight_decay")
    if wd is None or lr is None:
        return None
    return wd if row.get("wd_mode") == "independent" else lr * wd


def markdown_table(agg: dict, select: dict | None = None) -> str:
    """The report: per optimizer its best cell (lrs tried, edge flags, decay), paired differences, all cells.

    ``select``: the aggregate of the selection runs when they differ from ``agg`` (``--tune-seeds``)."""
    select = select or agg
    task, best = agg["task"], agg["best"]
    ref_spec = reference_spec(agg)
    ref = best[ref_spec]
    ref_ms = ref["ms_per_step"][0]
    metric = "val ppl" if task == "lm" else "val acc (%)"
    lines = [
        "| optimizer | backend | lr (tried) | AdamW-part lr (tried) | decay/step (matrix; AdamW part) "
        f"| seeds | val loss | {metric} | ms/step | time vs {ref_spec} | mean alpha |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, row in best.items():
        if task == "lm":
            m = fmt(*row["val_ppl"], digits=2)
        else:
            a = row["val_acc"]
            m = fmt(a[0] * 100, a[1] * 100 if a[1] is not None else None, digits=2)
        ms = row["ms_per_step"][0]
        rel = f"{ms / ref_ms:.2f}x" if ms and ref_ms else "-"
        sel_best = select["best"].get(spec, row)
        flags = edge_flags(select["rows"], sel_best)
        srows = [r for r in select["rows"] if r["spec"] == spec]
        lr_cell = f"{row['lr']:g} ({_tried(r['lr'] for r in srows if r['adamw_lr'] == sel_best['adamw_lr'])})"
        lr_cell += _flag(flags.get("lr"))
        if row["adamw_lr"] is None:
            alr_cell = "-"
        else:
            alr_cell = (
                f"{row['adamw_lr']:g} ({_tried(r['adamw_lr'] for r in srows if r['lr'] == sel_best['lr'])})"
            )
            alr_cell += _flag(flags.get("adamw_lr"))
        d_m, d_a = decay_per_step(row, row["lr"]), decay_per_step(row, row["adamw_lr"])
        decay = "-" if d_m is None else f"{d_m:.2g}" + ("" if d_a is None else f"; {d_a:.2g}")
        lines.append(
            f"| {spec} | {row.get('backend') or '-'} | {lr_cell} | {alr_cell} | {decay} | "
            f"{_seeds(row['seeds'])} | "
            f"{fmt(*row['val_loss'], digits=4)} | {m} | "
            f"{fmt(*row['ms_per_step'], digits=1)} | {rel} | {fmt(*row['mean_alpha'], digits=3)} |"
        )
    diffs = paired_differences(agg, ref_spec)
    if diffs:
        what = "val loss" if task == "lm" else "val accuracy"
        unit = "" if task == "lm" else "; accuracy as a fraction, 0.01 = 1 point"
        lines += [
            "",
            f"Paired differences to {ref_spec} ({what} of the optimizer minus {ref_spec}'s, same seed, "
            f"best cells{unit}):",
            "",
            f"| optimizer | per seed | mean ± std | 95% interval of the mean | worse than {ref_spec} on |",
            "|---|---|---|---|---|",
        ]
        for spec, d in diffs.items():
            per = ", ".join(f"s{s}: {v:+.4f}" for s, v in d["per_seed"].items())
            m, sd = d["mean_std"]
            ms_txt = "-" if m is None else (f"{m:+.4f}" + ("" if sd is None else f" ± {sd:.4f}"))
            ci = "-" if d["ci95"] is None else "[{:+.4f}, {:+.4f}]".format(*d["ci95"])
            lines.append(f"| {spec} | {per} | {ms_txt} | {ci} | {d['worse']} of {d['n']} seeds |")
        lines += [
            "",
            "The interval is Student's t over the seeds' paired differences: where it holds 0, the gap "
            "is within the seed noise at that level; more seeds narrow it as 1/sqrt(n).",
        ]
    if len(select["rows"]) > len(select["best"]):
        seeds = sorted({s for r in select["rows"] for s in r["seeds"]})
        image = task == "image"  # the cells are selected on accuracy: show it, the best in bold
        lines += [
            "",
            f"All cells tried (selection seeds {_seeds(seeds)}; best per optimizer in bold):",
            "",
            "| optimizer | lr | AdamW-part lr | seeds | val loss |" + (" val acc (%) |" if image else ""),
            "|---|---|---|---|---|" + ("---|" if image else ""),
        ]
        for row in sorted(select["rows"], key=lambda r: (r["spec"], r["lr"], r["adamw_lr"] or 0.0)):
            cells = [fmt(*row["val_loss"], digits=4)]
            if image:
                a = row["val_acc"]
                cells.append(fmt(a[0] * 100, a[1] * 100 if a[1] is not None else None, digits=2))
            if select["best"][row["spec"]] is row:
                cells[-1] = f"**{cells[-1]}**"
            alr = "-" if row["adamw_lr"] is None else f"{row['adamw_lr']:g}"
            lines.append(f"| {row['spec']} | {row['lr']:g} | {alr} | {row['n']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def machine(threads: int | None = None) -> str:
    """The machine line of a report; ``threads``: the runs' torch threads (their config's ``threads``;
    0 = torch's default), which the reporting process's own count need not be."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if threads is None:
        run_threads = f"torch threads {torch.get_num_threads()}"
    else:
        count = str(threads) if threads > 0 else f"torch's default ({torch.get_num_threads()})"
        run_threads = f"torch threads per run {count}"
    dev = f"{os.cpu_count()} CPU cores ({cpu}), {run_threads}"
    if torch.cuda.is_available():
        dev += f", GPU {torch.cuda.get_device_name(0)}"
    return f"{dev}; {platform.platform()}; torch {torch.__version__}; python {platform.python_version()}"


# ----------------------------------------------------------------------------- plots


def _eval_sizes(run_dir: Path) -> tuple[int | None, int, int]:
    """(steps, eval_batches, final_eval_batches) of a run's config.json: its last validation record, at
    ``steps``, is the evaluation at the end (0 batches: the whole held-out split); the others read
    windows of ``eval_batches``. (None, 0, 0) when the file cannot be read."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        return int(cfg["steps"]), int(cfg.get("eval_batches", 0)), int(cfg.get("final_eval_batches", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None, 0, 0


def plot_curves(agg: dict, path: Path) -> None:
    """Train loss and validation curves of each optimizer's best cell, mean ± std over seeds.

    The validation points during training read a window of ``eval_batches`` batches each, the one at the
    end the whole held-out split (``final_eval_batches`` 0): another estimate, drawn as its own marker,
    not joined to the windows' line (joined, every curve seemed to rise or drop at its last point). For a
    language model the y-axis is zoomed on the later part of training; the axis label says so when it
    cuts off the early values."""
    import numpy as np

    from htmuon.train.loop import read_metrics

    fig, axes = _figure(1, 2)
    task = agg["task"]
    key = "loss" if task == "lm" else "acc"
    windows, finals = set(), set()  # eval_batches of the windows; final_eval_batches of the end points
    n_stars = 0  # each optimizer's end marker is smaller than the one before: near-equal ends stay visible
    for spec, row in agg["best"].items():
        train_curves, val_curves, end_points, sizes = [], [], [], []
        for d in row["run_dirs"]:
            recs = read_metrics(Path(d) / "metrics.jsonl")
            train_curves.append({r["step"]: r["loss"] for r in recs if r["kind"] == "train"})
            val = {r["step"]: r[key] for r in recs if r["kind"] == "val"}
            steps, eval_batches, final_batches = _eval_sizes(Path(d))
            # the end's evaluation is another estimate unless the windows read the whole split too
            if steps in val and (eval_batches or final_batches):
                end_points.append((steps, val[steps]))
                sizes.append((eval_batches, final_batches))
            val_curves.append(val)
        # one marker at one step for every seed, or none: the end points stay on the line (a seed
        # whose config.json is gone, whose end would be missing from the mean)
        star = len(end_points) == len(row["run_dirs"]) and len({s for s, _ in end_points}) == 1
        if star:
            for val in val_curves:
                val.pop(end_points[0][0])
            windows.update(w for w, _ in sizes)
            finals.update(f for _, f in sizes)
        color = None
        for ax, curves in ((axes[0], train_curves), (axes[1], val_curves)):
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            y = np.array([[c[s] for s in steps] for c in curves], dtype=float)
            mean = y.mean(0)
            kw = {} if color is None else {"color": color}
            (line,) = ax.plot(steps, mean, label=_label(spec, row), lw=1.5, **kw)
            color = line.get_color()
            if len(curves) > 1:
                sd = y.std(0, ddof=1)
                ax.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)
        if star:
            ys = np.array([v for _, v in end_points], dtype=float)
            sd = ys.std(ddof=1) if len(ys) > 1 else 0.0
            ms = max(5, 14 - 4 * n_stars)
            n_stars += 1
            axes[1].errorbar(
                [end_points[0][0]],
                [ys.mean()],
                yerr=[sd],
                fmt="*",
                ms=ms,
                mec="black",
                mew=0.4,
                color=color,
                capsize=0,
                zorder=3 + 0.01 * n_stars,
            )
    n = max(r["n"] for r in agg["best"].values())
    band = f"mean ± std over {n} seeds" if n > 1 else "1 seed"
    axes[0].set(title=f"train loss ({band})", xlabel="step", ylabel="loss")
    axes[1].set(
        title=f"validation {'loss' if task == 'lm' else 'accuracy'} ({band})",
        xlabel="step",
        ylabel="loss" if task == "lm" else "accuracy",
    )
    if task == "lm":
        # zoom on the later part of training, where the optimizers differ
        for ax in axes:
            lines = [ln.get_ydata() for ln in ax.get_lines() if len(ln.get_ydata())]
            if lines:
                lo = min(float(np.min(y)) for y in lines)
                hi = max(float(np.percentile(y, 60)) for y in lines)
                if hi > lo:
                    ax.set_ylim(lo - 0.05 * (hi - lo), hi)
                    if max(float(np.max(y)) for y in lines) > hi:  # values cut off: say so
                        ax.set_ylabel(f"{ax.get_ylabel()} (zoomed: early values off the top)")
    handles = {}
    if windows or finals:
        from matplotlib.lines import Line2D  # matplotlib is there: _figure imported it

        def sizes(batches: set[int], part: str) -> str:
            whole = "the whole held-out split"
            return " / ".join(f"{part}{b} batches" if b else whole for b in sorted(batches))

        during = f"during training: {sizes(windows, 'windows of ')}"
        handles["during"] = Line2D([], [], ls="-", color="gray", label=during)
        end = f"at the end: {sizes(finals, '')}"
        handles["end"] = Line2D([], [], ls="none", marker="*", ms=10, color="gray", label=end)
    for ax in axes:
        ax.grid(alpha=0.3)
        extra = list(handles.values()) if ax is axes[1] else []
        ax.legend(handles=[*ax.get_legend_handles_labels()[0], *extra], fontsize=8)
    _save(fig, path)


def plot_alpha_curves(agg: dict, path: Path) -> bool:
    """Mean layer-wise alpha over training (runs with ``alpha_every``), mean ± std over seeds.

    Returns False (and writes nothing) when no run recorded alpha during training."""
    import numpy as np

    from htmuon.train.loop import read_metrics

    series = {}
    for spec, row in agg["best"].items():
        curves = []
        for d in row["run_dirs"]:
            recs = read_metrics(Path(d) / "metrics.jsonl")
            c = {
                r["step"]: r["mean_alpha"]
                for r in recs
                if r["kind"] == "alpha" and r.get("mean_alpha") is not None
            }
            if c:
                curves.append(c)
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            series[spec] = (row, steps, np.array([[c[s] for s in steps] for c in curves], dtype=float))
    if not series:
        return False
    fig, (ax,) = _figure(1, 1)
    for spec, (row, steps, y) in series.items():
        mean = y.mean(0)
        (line,) = ax.plot(steps, mean, label=_label(spec, row), lw=1.5, marker="o", ms=3)
        if len(y) > 1:
            sd = y.std(0, ddof=1)
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
    n = max(len(y) for _, _, y in series.values())
    band = f"mean ± std over {n} seeds" if n > 1 else "1 seed"
    ax.set(title=f"mean layer-wise alpha during training ({band})", xlabel="step", ylabel="mean alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_lr_grid(agg: dict, path: Path) -> bool:
    """Final validation loss (accuracy) against each lr tried, per optimizer (the paper's Fig. 12 style).

    Left: against the matrix lr, one line per AdamW-part lr; right: against the AdamW-part lr, one
    line per matrix lr (Muon family). The best cell is ringed. False (nothing written) for a single cell
    per optimizer."""
    if all(sum(r["spec"] == spec for r in agg["rows"]) < 2 for spec in agg["best"]):
        return False
    key = "val_acc" if agg["task"] == "image" else "val_loss"
    fig, axes = _figure(1, 2)
    for ax, dim, other in ((axes[0], "lr", "adamw_lr"), (axes[1], "adamw_lr", "lr")):
        for spec, best in agg["best"].items():
            rows = [r for r in agg["rows"] if r["spec"] == spec and r[dim] is not None]
            for o in sorted({r[other] for r in rows}, key=lambda v: v or 0.0):
                line = sorted((r for r in rows if r[other] == o), key=lambda r: r[dim])
                if len(line) < 2 and o != best[other]:
                    continue
                xs = [r[dim] for r in line]
                ys = [r[key][0] if math.isfinite(r[key][0]) else float("nan") for r in line]
                label = spec + ("" if o is None else f" ({other.replace('_', '-')} {o:g})")
                (ln,) = ax.plot(xs, ys, marker="o", ms=4, lw=1.2, label=label)
                if best[other] == o and best[dim] is not None:
                    ax.plot([best[dim]], [best[key][0]], "o", mfc="none", mec=ln.get_color(), ms=11)
        ax.set_xscale("log")
        ax.set(
            xlabel="matrix lr (adamw: its lr)" if dim == "lr" else "AdamW-part lr",
            ylabel=key.replace("_", " "),
        )
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    axes[0].set_title("final validation vs lr (best ringed)")
    axes[1].set_title("final validation vs AdamW-part lr")
    _save(fig, path)
    return True


#: the optimizer names the p grid plots (p = 0 is Muon)
P_GRID_NAMES = ("muon", "htmuon")


def plot_p_grid(agg: dict, path: Path) -> bool:
    """Best final validation loss against the spectral power p (Fig. 8 style; p = 0 is Muon), mean ± std.

    Only ``muon`` and ``htmuon`` specs (one update rule, U s^p V^T) are points: the plug-ins
    (NorMuon, AdaMuon, their HT versions: U s^p V^T then a normalisation) and the interval
    variant are other methods, not other values of p. False (nothing written) unless those specs
    span at least two values of p."""
    pts = [
        (row["p"], spec, row)
        for spec, row in agg["best"].items()
        if row.get("p") is not None and parse_spec(spec)[0] in P_GRID_NAMES
    ]
    if len({p for p, _, _ in pts}) < 2:
        return False
    key = "val_acc" if agg["task"] == "image" else "val_loss"
    fig, (ax,) = _figure(1, 1)
    for p, spec, row in sorted(pts, key=lambda t: t[0]):
        m, sd = row[key]
        ax.errorbar([p], [m], yerr=[sd or 0.0], fmt="o", capsize=3, label=f"{spec} (p={p:g})")
    ax.set(xlabel="p (spectral power; 0 = Muon)", ylabel=key.replace("_", " "), title="final validation vs p")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def _label(spec: str, row: dict) -> str:
    alr = "" if row.get("adamw_lr") is None else f", AdamW part {row['adamw_lr']:g}"
    return f"{spec} (lr {row['lr']:g}{alr})"


def _figure(rows: int, cols: int):
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        from htmuon.cli import UserError

        raise UserError("plots need matplotlib: pip install htmuon[plot] (or pass --no-plots)") from None
    fig = Figure(figsize=(5.5 * cols, 4 * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]
    for ax in axes:  # losses that differ in the 4th digit: "4.2731" on each tick, not "0.0004" and "+4.273"
        ax.ticklabel_format(axis="y", useOffset=False)
    return fig, axes


def _save(fig, path: Path) -> None:
    from htmuon.train.data import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def alpha_reports(agg: dict, left_out: list[Path] | None = None) -> dict | None:
    """Layer-wise ESD reports of each optimizer's final model (best lr, its first seed that did not
    diverge; an optimizer whose best cell diverged on every seed has no final model and is left
    out), or None. A finished cell whose checkpoints were deleted (its summary reused) has no final
    model either: its optimizer is left out and its run folder appended to ``left_out``."""
    try:
        from htmuon.diagnostics import analyze
    except ImportError:
        return None
    reports = {}
    for spec, row in agg["best"].items():
        finite = [d for d, seed in zip(row["run_dirs"], row["seeds"]) if math.isfinite(row["losses"][seed])]
        if not finite:
            continue
        model = _final_model(Path(finite[0]))
        if model is None:
            if left_out is not None:
                left_out.append(Path(finite[0]))
            continue
        reports[spec] = analyze(model, fit="ks")  # (under torch.no_grad() itself)
    return reports or None


def _cell_names(run_dirs, out: Path) -> str:
    """Run folders as the grid names its cells (SPEC/lrLR.../seedN, relative to ``out``)."""
    names = []
    for d in run_dirs:
        try:
            names.append(str(Path(d).relative_to(out)))
        except ValueError:  # a run outside the grid's folder (write_report given plain summaries)
            names.append(str(d))
    return ", ".join(names)


def plot_alpha(reports: dict, path: Path) -> bool:
    try:
        from htmuon.diagnostics.plots import plot_layer_alpha
    except ImportError:
        return False
    plot_layer_alpha(reports, str(path))
    return True


# ----------------------------------------------------------------------------- entry point

#: the plots a report may write in its folder
REPORT_PLOTS = ("val_curves.png", "lr_grid.png", "p_grid.png", "alpha.png", "alpha_curves.png")


def write_report(
    result: dict, out: Path, name: str, command: str, wall_s: float, plots: bool = True, notes=()
) -> dict:
    """results.md / results.json / plots for ``run_plan``'s result (or a plain list of run summaries)."""
    from htmuon.train.data import atomic_write_bytes
    from htmuon.train.loop import read_json

    if isinstance(result, list):
        result = {"select": result, "report": result, "extension_rounds": 0}
    summaries, select_runs = result["report"], result["select"]
    agg = aggregate(summaries)
    sel = aggregate(select_runs) if select_runs is not summaries else agg
    table = markdown_table(agg, sel)
    cfg0 = read_json(Path(summaries[0]["run_dir"]) / "config.json", "run config")  # damaged: one line
    files, alpha_notes = [], []
    if plots:
        plot_curves(agg, out / "val_curves.png")
        files.append("val_curves.png")
        if plot_lr_grid(sel, out / "lr_grid.png"):
            files.append("lr_grid.png")
        if plot_p_grid(agg, out / "p_grid.png"):
            files.append("p_grid.png")
        no_ckpt: list[Path] = []
        # --no-alpha: no alpha in the table, and no final models loaded and analysed for alpha.png
        reports = alpha_reports(agg, no_ckpt) if cfg0.get("alpha", True) else None
        if reports and plot_alpha(reports, out / "alpha.png"):
            files.append("alpha.png")
        if no_ckpt:
            what = "alpha.png leaves out" if "alpha.png" in files else "no alpha.png: it would show"
            alpha_notes.append(
                f"{what} the cell(s) {_cell_names(no_ckpt, out)}: finished, but their "
                "checkpoints were deleted, so their final weights are gone (the table uses what their "
                "summaries record)."
            )
        if plot_alpha_curves(agg, out / "alpha_curves.png"):
            files.append("alpha_curves.png")
        for stale in REPORT_PLOTS:  # an earlier report's plot that this one has not (another grid)
            if stale not in files:
                (out / stale).unlink(missing_ok=True)
    all_runs = {s["run_dir"]: s for s in [*select_runs, *summaries]}.values()
    train_s = sum(s.get("wall_s") or s["elapsed_s"] for s in all_runs)
    eval_s = [s["final_eval_s"] for s in all_runs if s.get("final_eval_s")]
    final_eval = (
        "the whole held-out split"
        if not cfg0.get("final_eval_batches")
        else (f"{cfg0['final_eval_batches']} batches")
    )
    wd_txt = (
        f"weight decay {cfg0['weight_decay']} x lr per step (torch's convention)"
        if cfg0.get("wd_mode", "lr") == "lr"
        else f"weight decay {cfg0['weight_decay']} per step at peak lr, x the schedule (independent of lr)"
    )
    notes = list(notes)
    missing = [s["run_dir"] for s in all_runs if s.get("mean_alpha_missing")]
    if missing:
        notes.append(
            f"mean alpha not known for the cell(s) {_cell_names(missing, out)}: their summaries record "
            "none (run before it was recorded) and their checkpoints were deleted."
        )
    notes += alpha_notes
    if result.get("extension_rounds"):
        notes.append(f"{result['extension_rounds']} round(s) of grid extension at an edge were run.")
    md = [
        f"# htmuon compare: {name}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine(cfg0.get('threads'))}",
        "",
        f"Wall time of this command: {wall_s / 60:.1f} min; training time of all {len(all_runs)} runs "
        f"(steps and evaluations, summed; reused runs included): {train_s / 60:.1f} min.",
        "",
        f"Model {cfg0['model']}, data {cfg0['data']}, {cfg0['steps']} steps (warmup {cfg0['warmup_steps']}, "
        f"cosine to {cfg0['min_lr_ratio']}x), batch {cfg0['batch_size']}x{cfg0['grad_accum']}"
        + (f", seq_len {cfg0['seq_len']}" if agg["task"] == "lm" else "")
        + f", routing {cfg0['routing']}, {wd_txt}. Periodic evaluations: {cfg0['eval_batches']} batches, "
        f"a window moving over the held-out split; final metric: {final_eval}"
        + (f" (median {sorted(eval_s)[len(eval_s) // 2]:.1f} s per run)." if eval_s else "."),
        "",
        "Final validation metrics at the best cell per optimizer, mean ± sample std over the seeds listed; "
        "ms/step is the median time of a training step, eval excluded (mean over seeds). An lr marked "
        "EDGE is the best at the edge of what was tried: the optimum may lie beyond it.",
        "",
        table,
    ]
    if notes:
        md += ["Protocol notes:", "", *[f"- {n}" for n in notes], ""]
    md += [f"![{f}]({f})" for f in files]
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode())
    serial = {
        "task": agg["task"],
        "best": {k: _jsonable(v) for k, v in agg["best"].items()},
        "rows": [_jsonable(r) for r in sel["rows"]],
        "paired_differences": {
            k: _jsonable(v) for k, v in paired_differences(agg, reference_spec(agg)).items()
        },
        "notes": notes,
        "runs": list(all_runs),
        "command": command,
        "machine": machine(cfg0.get("threads")),
        "wall_s": wall_s,
    }
    atomic_write_bytes(out / "results.json", (json.dumps(serial, indent=2) + "\n").encode())
    return {"agg": agg, "table": table, "files": files, "notes": notes}


def _jsonable(row: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}


def size_scan_rows(per_model: dict[str, dict]) -> list[dict]:
    """Per model, by size: parameters, steps and each spec's paired difference to Muon."""
    rows = []
    for model, rep in per_model.items():
        agg = rep["agg"]
        ref = reference_spec(agg)
        run0 = next(r for r in rep["runs"] if r["spec"] == ref)
        rows.append(
            {
                "model": model,
                "parameters": (run0.get("info") or {}).get("parameters"),
                "steps": run0.get("steps"),
                "ref": ref,
                "ref_loss": agg["best"][ref]["val_loss"],
                "diffs": {k: v["mean_std"] for k, v in paired_differences(agg, ref).items()},
                "per_seed": {k: v["per_seed"] for k, v in paired_differences(agg, ref).items()},
            }
        )
    return sorted(rows, key=lambda r: r["parameters"] or 0)


def _finite_diffs(row: dict, spec: str) -> list[float]:
    """The paired differences of ``spec`` that a size-scan row's mean is over (a diverged seed's NaN is
    left out)."""
    return [d for d in row["per_seed"].get(spec, {}).values() if math.isfinite(d)]


def size_scan_table(rows: list[dict]) -> str:
    specs = list(dict.fromkeys(k for r in rows for k in r["diffs"]))
    ref = rows[0]["ref"]
    head = ["model", "parameters", "steps", f"{ref} val loss", *(f"{s} − {ref}" for s in specs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for spec in specs:
            m, sd = r["diffs"].get(spec, (None, None))
            finite = _finite_diffs(r, spec)
            if len(finite) > 1:  # the spread, and the 95% interval of the mean (see mean_interval)
                lo, hi = mean_interval(finite)
                spread = f" ± {sd:.4f} ({len(finite)} seeds; 95%: {lo:+.4f} to {hi:+.4f})"
            else:
                spread = " (1 seed)"
            cells.append("-" if m is None else f"{m:+.4f}" + spread)
        n = r["parameters"]
        row = [r["model"], f"{n / 1e6:.2f} M", str(r["steps"]), fmt(*r["ref_loss"], digits=4), *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _half_interval(row: dict, spec: str) -> float:
    """Half the width of the 95% interval of a size-scan row's mean paired difference (0 for one seed)."""
    ci = mean_interval(_finite_diffs(row, spec))
    return 0.0 if ci is None else (ci[1] - ci[0]) / 2


def plot_gap_vs_params(rows: list[dict], path: Path) -> None:
    """Paired difference to Muon (final validation loss) against parameters: the mean over seeds with
    its 95% interval (:func:`mean_interval`), so that sizes run on different numbers of seeds are
    drawn with the precision each has."""
    fig, (ax,) = _figure(1, 1)
    specs = list(dict.fromkeys(k for r in rows for k in r["diffs"]))
    for spec in specs:
        pts = [
            (r["parameters"], r["diffs"][spec][0], _half_interval(r, spec))
            for r in rows
            if r["diffs"].get(spec, (None,))[0] is not None
        ]
        if pts:
            x, m, half = zip(*pts)
            bars = ax.errorbar(x, m, yerr=half, marker="o", capsize=3, label=spec)
            for r in rows:  # a point of one seed has no spread to show: hollow, and labelled so
                if len(_finite_diffs(r, spec)) == 1 and r["diffs"][spec][0] is not None:
                    xy = (r["parameters"], r["diffs"][spec][0])
                    ax.plot(*xy, marker="o", ms=9, mfc="white", color=bars[0].get_color(), zorder=3)
                    ax.annotate("1 seed", xy, textcoords="offset points", xytext=(6, 6), fontsize=7)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter  # matplotlib is there: _figure imported it

    sizes = sorted({r["parameters"] for r in rows if r["parameters"]})
    ax.set_xticks(sizes, [f"{n / 1e6:.3g} M" for n in sizes])  # each model's size, not log decades
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(
        xlabel="parameters",
        ylabel=f"val loss − {rows[0]['ref']}'s (paired by seed)",
        title="gap to Muon vs model size\n(mean over seeds, 95% interval)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def carried_grids(best: dict[str, dict], width: int = 3) -> dict[str, list[str]]:
    """``--carry-lrs``: the next model's grids from a smaller model's best cells (results.json "best").

    Per spec the matrix lr is tried at ``width`` values ``2^j`` x its best there, ``j`` from
    ``-(width // 2)`` to ``width // 2`` (3: 1/2, 1, 2, so that an edge is seen and ``--extend-edges``
    can go past it; 1: the best alone). The AdamW-part lr is tried, for every spec with an AdamW part,
    at each AdamW-part lr that any spec chose there (``width`` 1: its own): the optimum of that lr moves
    with the run's length (which grows with the model at a fixed budget of tokens per parameter), and
    keeping each optimizer's own would compare them at different values of it. Returned as
    ``--lr-grid`` / ``--adamw-lr-grid`` items keyed by the full spec (a spec's grid wins over its name's);
    none for an lr the spec sets itself (``muon:lr=0.01``: that lr at every size)."""
    lr_grid, adamw_grid = [], []
    shared = sorted({row["adamw_lr"] for row in best.values() if row.get("adamw_lr") is not None})
    for spec, row in best.items():
        own = parse_spec(spec)[1]  # an lr the spec sets itself is its lr at every size: no grid for it
        lr = row["lr"]
        lrs = sorted({float(f"{lr * 2.0**j:.3g}") for j in range(-(width // 2), width // 2 + 1)})
        if "lr" not in own:
            lr_grid.append(f"{spec}=" + ",".join(f"{v:g}" for v in lrs))
        if row.get("adamw_lr") is not None and "adamw_lr" not in own:
            alrs = [row["adamw_lr"]] if width == 1 else shared
            adamw_grid.append(f"{spec}=" + ",".join(f"{v:g}" for v in alrs))
    return {"lr_grid": lr_grid, "adamw_lr_grid": adamw_grid}


def carry_args(model: str, width: int, best: dict[str, dict]) -> dict:
    """The next model's ``compare`` arguments under ``--carry-lrs`` ``width``: its grids from ``model``'s
    best cells (:func:`carried_grids`) and the note its report gives about them."""
    carried: dict = carried_grids(best, width)
    if width == 1:  # one cell per optimizer: nothing to select
        carried["tune_seeds"] = None
        carried["carry_note"] = (
            f"lrs carried from {model} (--carry-lrs 1): each optimizer at its best matrix lr and "
            "AdamW-part lr there, not tuned at this size."
        )
    else:
        factors = ", ".join(f"{2.0**j:g}" for j in range(-(width // 2), width // 2 + 1))
        carried["carry_note"] = (
            f"lrs carried from {model} (--carry-lrs {width}): each matrix lr tuned on {factors} x "
            "its best there, the AdamW-part lr on the values the optimizers chose there (every "
            "optimizer on all of them)."
        )
    return carried


def carry_widths(value: str | int | None, n_models: int) -> list[int]:
    """``--carry-lrs``'s value as one width per step between consecutive models (``n_models - 1``).

    ``"3"`` is 3 at every step; ``"3,1"`` 3 from the first model to the second and 1 from the second
    to the third (e.g. selection where a cell is cheap, the carried lr alone where it takes hours);
    ``"0"`` or ``None``: no carrying. Every width is an odd positive number (0 alone means none).
    """
    from htmuon.cli import UserError

    text = str(value if value is not None else 0).strip()
    try:
        widths = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--carry-lrs takes odd numbers of lrs such as 3 or 3,1, got {text!r}") from None
    steps = max(n_models - 1, 0)
    if widths == [0]:
        return [0] * steps
    for w in widths:
        if w <= 0 or w % 2 == 0:
            raise UserError(f"--carry-lrs must be an odd number of lrs (1, 3, 5, ...), got {w}")
    if len(widths) == 1:
        return widths * steps
    if len(widths) != steps:
        raise UserError(
            f"--carry-lrs {text} gives {len(widths)} widths, but {n_models} models have {steps} "
            "step(s) between them: give one width, or one per step"
        )
    return widths


def main_models(args: argparse.Namespace) -> int:
    """``--models``: the protocol once per model in OUT/MODEL, and after each OUT/size_scan.md and
    gap_vs_params.png for the models done so far."""
    from htmuon.cli import UserError

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise UserError("--models is empty: give a comma-separated list of model presets")
    if len(set(models)) != len(models):
        raise UserError(f"--models lists a model twice: {','.join(models)}")
    if getattr(args, "model", None) is not None:  # each model's runs take their model from --models
        raise UserError(f"--model {args.model} and --models {args.models}: give one of them")
    widths = carry_widths(getattr(args, "carry_lrs", 0), len(models))
    name = args.preset or "custom"
    root = grid_folder(args, name)
    for model in models:  # every model's plan (its name, its config) before the first one trains
        plan_grid(argparse.Namespace(**{**vars(args), "model": model, "models": None, "carry_lrs": 0}))
    per_model, status = {}, 0
    carried: dict = {}
    status_only = getattr(args, "status", False)  # --status: list the cells, train nothing
    for model, width in zip(models, widths + [0]):
        given = vars(args)
        if carried.get("adamw_lr_grid"):  # carried from the model before: --adamw-lr was the first one's
            given = {k: v for k, v in given.items() if k != "adamw_lr"}
        sub = argparse.Namespace(
            **{
                **given,
                "model": model,
                "compare_out": str(root / model),
                "models": None,
                "carry_lrs": 0,
                **carried,
            }
        )
        if status_only:
            result, text = plan_status(plan_grid(sub), args.extend_edges)
            print(f"{model}: {text}")
            if result is None and width:
                later = ", ".join(models[models.index(model) + 1 :])
                print(f"{later}: their lrs are carried from {model}'s best cells; listed once it is finished")
                return 0
            best = aggregate(result["report"])["best"] if result else {}
        else:
            status |= main(sub)
            res = json.loads((root / model / "results.json").read_text())
            per_model[model] = {"agg": aggregate(_report_runs(res)), "runs": res["runs"]}
            best = res["best"]
        if width:
            carried = carry_args(model, width, best)
        if status_only:
            continue
        # after every model, so a scan cut short (a larger model takes hours) has its table and plot
        write_size_scan(root, name, models, per_model, args.no_plots)
    return status


def write_size_scan(root: Path, name: str, models: list[str], per_model: dict, no_plots: bool) -> None:
    """OUT/size_scan.md (and gap_vs_params.png) for the models done so far, ``models`` in all."""
    from htmuon.train.data import atomic_write_bytes

    rows = size_scan_rows(per_model)
    table = size_scan_table(rows)
    left = [m for m in models if m not in per_model]
    md = [
        f"# htmuon compare size scan: {name}",
        "",
        f"Models: {', '.join(models)} (each: MODEL/results.md).",
        "",
    ]
    if left:
        md += [f"Done so far: {', '.join(per_model)}; still to run: {', '.join(left)}.", ""]
    md += ["Paired differences of the final validation loss to Muon at each model's best cells:", "", table]
    files = []
    if not any(r["diffs"] for r in rows):  # the reference optimizer alone: no gap to plot
        md.append(f"(only {rows[0]['ref']} was run: no other optimizer to compare with it)")
    elif not no_plots:
        plot_gap_vs_params(rows, root / "gap_vs_params.png")
        files.append("gap_vs_params.png")
        md.append("![gap vs parameters](gap_vs_params.png)")
    atomic_write_bytes(root / "size_scan.md", ("\n".join(md) + "\n").encode())
    print(table)
    print(f"wrote {root / 'size_scan.md'}" + "".join(f", {root / f}" for f in files))


def _report_runs(res: dict) -> list[dict]:
    """The reported runs of a results.json: the report phase's, else the best cells' (shared seeds)."""
    runs = res["runs"]
    report = [r for r in runs if r.get("phase") == "report"]
    if report:
        return report
    best = {(b["spec"], b["lr"], b.get("adamw_lr")) for b in res["best"].values()}
    return [r for r in runs if (r["spec"], r["lr"], r.get("adamw_lr")) in best]


def _specs_to_train(plan: Plan) -> list[str]:
    """The specs with a cell left to train: a selection cell not finished, or (``--tune-seeds``) a
    reported seed with no finished cell of the spec's grid. A finished grid's report can then be
    rebuilt without its data or a baseline's package. A cell whose folder holds a run of another
    config is the UserError the run would stop on, raised now (before its data is looked for)."""

    def finished(cell: Cell) -> bool:
        st = cell_state(cell)
        if st["state"] == "refused":
            raise _refused(cell, st["why"])
        return st["state"] in ("done", "diverged")

    todo = {c.spec for c in plan.select_cells() if not finished(c)}
    for spec in plan.specs if plan.tune_seeds else ():
        grid = [(lr, alr) for lr in plan.lrs[spec] for alr in plan.adamw_lrs.get(spec, [None])]
        if not all(any(finished(plan.cell(spec, *c, seed, "report")) for c in grid) for seed in plan.seeds):
            todo.add(spec)
    return [spec for spec in plan.specs if spec in todo]


def check_plan(plan: Plan) -> None:
    """Before any cell trains: each optimizer spec with cells left to train builds its optimizer (on a
    small stand-in model) and each LM data source exists, so that a misspelt option or path is a
    one-line error now, not after the cells before it have trained (hours, at scale). Raises the
    UserError the run would raise."""
    from torch import nn

    from htmuon.cli import UserError
    from htmuon.train.data import _source_identity
    from htmuon.train.optimizers import build_optimizer
    from htmuon.train.presets import model_task

    checked: set[str] = set()
    for spec in _specs_to_train(plan):
        first = (plan.lrs[spec][0], plan.adamw_lrs.get(spec, [None])[0], plan.select_seeds[0])
        cfg = plan.cell(spec, *first, "select").cfg
        if model_task(cfg.model) == "lm" and cfg.data not in checked:
            _source_identity(cfg.data, cfg.text_field, cfg.max_docs)  # "not found", naming the source
            checked.add(cfg.data)
        stand_in = nn.ModuleDict(
            {"embed": nn.Embedding(8, 4), "mlp": nn.Linear(4, 4), "lm_head": nn.Linear(4, 8)}
        )
        try:
            build_optimizer(stand_in, cfg)
        except UserError:
            raise
        except Exception:  # the stand-in does not fit this optimizer: the real model will tell
            pass


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if getattr(args, "list_presets", False):  # as htmuon train --list-presets
        from htmuon.train.cli import list_presets

        list_presets()
        return 0
    if getattr(args, "models", None):
        return main_models(args)
    if str(getattr(args, "carry_lrs", 0) or 0) != "0":
        from htmuon.cli import UserError

        raise UserError("--carry-lrs carries lrs from one model to the next: it needs --models")
    plan = plan_grid(args)
    if getattr(args, "status", False):
        print(plan_status(plan, args.extend_edges)[1])
        return 0
    check_plan(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    for note in plan.notes:
        print(("warning: " if "WARNING" in note else "note: ") + note, file=sys.stderr)
    result = run_plan(plan, args.extend_edges)
    command = "htmuon " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = write_report(
        result, plan.out, plan.name, command, time.perf_counter() - t0, not args.no_plots, plan.notes
    )
    print(report["table"])
    for note in report["notes"]:
        print(f"- {note}")
    print(f"wrote {plan.out / 'results.md'}" + "".join(f", {plan.out / f}" for f in report["files"]))
    return 1 if all(s["diverged"] for s in result["report"]) else 0  # (a grid is never empty)
