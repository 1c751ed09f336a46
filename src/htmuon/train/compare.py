"""``htmuon compare``: a grid of optimizers x seeds (x learning rates) and its report.

    htmuon compare --preset quick                       # AdamW, Muon, HTMuon; 1 seed
    htmuon compare --preset quick --seeds 0,1,2 --optimizers muon,htmuon,htmuon:method=ns
    htmuon compare --preset quick --lr-grid muon=0.01,0.02,0.04 htmuon=0.01,0.02,0.04

An optimizer spec is a name (``htmuon.train.optimizers.OPTIMIZERS``) with optional config
overrides, ``name:key=value,key=value`` (e.g. ``htmuon:method=ns,p=0.25``). Every cell is an
ordinary ``htmuon train`` run in OUT/SPEC/lrLR/seedSEED; a finished cell is reused and a
killed one resumed, so re-running the same command continues the grid. With several learning
rates the best one per optimizer is picked by mean final validation loss over seeds (accuracy
for image models), as the paper's grid search does; the table reports that lr.

Writes OUT/results.md (the table), OUT/results.json, OUT/val_curves.png and, when
``htmuon.diagnostics`` is available, OUT/alpha.png (layer-wise alpha per optimizer) and, for runs
with ``--alpha-every N``, OUT/alpha_curves.png (mean alpha over training).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

GRID_FIELDS = ("optimizer", "seed", "lr", "out_dir")


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
    parser.add_argument("--seeds", metavar="LIST", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument(
        "--lr-grid",
        nargs="+",
        metavar="NAME=LR,LR",
        help="learning rates per optimizer name or spec, e.g. muon=0.01,0.02 htmuon=0.02,0.04",
    )
    parser.add_argument(
        "--out-dir", dest="compare_out", metavar="DIR", help="grid folder [default: runs/compare-PRESET]"
    )
    parser.add_argument("--no-plots", action="store_true", help="write the table only")
    add_config_flags(parser, exclude=GRID_FIELDS)


# ----------------------------------------------------------------------------- the grid


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    from htmuon.cli import UserError
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
        coerce(key, value, from_string=True, where=f" in optimizer spec '{spec}'")
        overrides[key] = value.strip()
    return name, overrides


def parse_list(text: str, kind, what: str) -> list:
    from htmuon.cli import UserError

    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of numbers, got '{text}'") from None
    if not items:
        raise UserError(f"{what} is empty")
    return items


def parse_lr_grid(items: list[str] | None) -> dict[str, list[float]]:
    from htmuon.cli import UserError

    out: dict[str, list[float]] = {}
    for item in items or []:
        key, eq, values = item.partition("=")
        if not eq:
            raise UserError(f"--lr-grid expects NAME=LR,LR..., got '{item}'")
        lrs = parse_list(values, float, f"--lr-grid {key}")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise UserError(f"--lr-grid {key}: learning rates must be > 0, got '{values}'")
        out[key] = lrs
    return out


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec.replace(":", "__"))


def plan_grid(args: argparse.Namespace):
    """(base config, [(spec, lr, seed, cfg)], preset, out) for the command line."""
    from htmuon.cli import UserError
    from htmuon.train.cli import config_overrides, get_preset
    from htmuon.train.config import make_config
    from htmuon.train.loop import resolve_config

    preset = get_preset(args.preset)
    if preset is None and not args.optimizers:
        raise UserError("give --preset (e.g. quick) or --optimizers")
    specs = args.optimizers.split(",") if args.optimizers else list(preset.optimizers)
    specs = [s.strip() for s in specs if s.strip()]
    # a spec's own overrides contain commas: re-join "name:k=v,k=v" pieces split above
    joined: list[str] = []
    for s in specs:
        if joined and "=" in s and ":" not in s and ":" in joined[-1]:
            joined[-1] += "," + s
        else:
            joined.append(s)
    specs = joined
    if len(set(specs)) != len(specs):
        raise UserError(f"--optimizers lists a spec twice: {','.join(specs)}")
    seeds = parse_list(args.seeds, int, "--seeds") if args.seeds else list(preset.seeds if preset else (0,))
    grid = {k: list(v) for k, v in (preset.lr_grid.items() if preset else [])}
    grid.update(parse_lr_grid(args.lr_grid))
    base_overrides = config_overrides(args, exclude=GRID_FIELDS)
    name = args.preset or "custom"
    out = Path(args.compare_out or f"runs/compare-{name}").expanduser()
    cells = []
    for spec in specs:
        opt_name, spec_over = parse_spec(spec)
        lrs = grid.get(spec) or grid.get(opt_name) or [None]
        if "lr" in spec_over:
            lrs = [None]
        for lr in lrs:
            for seed in seeds:
                over = {**base_overrides, **spec_over, "optimizer": opt_name, "seed": str(seed)}
                if lr is not None:
                    over["lr"] = repr(lr)
                cfg = make_config(preset.config if preset else None, args.config, over, strings=True)
                cfg = resolve_config(cfg, preset.lrs if preset else None)
                run_dir = out / safe_name(spec) / f"lr{cfg.lr:g}" / f"seed{seed}"
                cells.append((spec, cfg.lr, seed, dataclasses.replace(cfg, out_dir=str(run_dir))))
    return cells, preset, out, name


def run_grid(cells, preset, quiet: bool = False) -> list[dict]:
    from htmuon.train.loop import train

    summaries = []
    for i, (spec, lr, seed, cfg) in enumerate(cells, 1):
        if not quiet:
            print(
                f"[{i}/{len(cells)}] {spec} lr={lr:g} seed={seed} -> {cfg.out_dir}",
                file=sys.stderr,
                flush=True,
            )
        s = train(cfg, resume=True, preset_lrs=preset.lrs if preset else None)
        if s.get("mean_alpha") is None and s["finished"] and cfg.alpha:
            s["mean_alpha"] = final_mean_alpha(Path(cfg.out_dir))  # a run finished before diagnostics existed
        summaries.append({**s, "spec": spec})
    return summaries


def _final_model(run_dir: Path):
    from htmuon.train import checkpoint
    from htmuon.train.config import from_dict
    from htmuon.train.loop import build_data_and_model

    ckpt = checkpoint.load(run_dir / checkpoint.CKPT_NAME)
    _, model, _ = build_data_and_model(from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def final_mean_alpha(run_dir: Path) -> float | None:
    """Mean layer-wise alpha of a finished run's final model, or None without htmuon.diagnostics."""
    try:
        import htmuon.diagnostics  # noqa: F401
    except ImportError:
        return None
    from htmuon.train.loop import mean_alpha

    return mean_alpha(_final_model(run_dir))


# ----------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def fmt(m: float | None, s: float | None, digits: int = 3) -> str:
    if m is None:
        return "-"
    if not math.isfinite(m):
        return "diverged"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(summaries: list[dict]) -> dict:
    """Per (spec, lr): mean ± std over seeds; per spec: the best lr on validation."""
    task = "image" if any(s.get("final_val_acc") is not None for s in summaries) else "lm"
    cells: dict[tuple[str, float], list[dict]] = {}
    for s in summaries:
        cells.setdefault((s["spec"], s["lr"]), []).append(s)
    rows = []
    for (spec, lr), runs in cells.items():
        loss = [r["final_val_loss"] for r in runs]
        row = {"spec": spec, "lr": lr, "seeds": [r["seed"] for r in runs], "n": len(runs)}
        row["val_loss"] = mean_std(loss)
        if task == "lm":
            row["val_ppl"] = mean_std(
                [math.exp(min(v, 50.0)) if math.isfinite(v) else math.inf for v in loss]
            )
        else:
            row["val_acc"] = mean_std(
                [r["final_val_acc"] if r["final_val_acc"] is not None else 0.0 for r in runs]
            )
        ms = [r["ms_per_step"] for r in runs if r.get("ms_per_step")]
        row["ms_per_step"] = mean_std(ms) if ms else (None, None)
        alphas = [r["mean_alpha"] for r in runs if r.get("mean_alpha") is not None]
        row["mean_alpha"] = mean_std(alphas) if alphas else (None, None)
        row["run_dirs"] = [r["run_dir"] for r in runs]
        rows.append(row)
    best: dict[str, dict] = {}
    for row in rows:
        key = (-row["val_acc"][0]) if task == "image" else row["val_loss"][0]
        cur = best.get(row["spec"])
        cur_key = None if cur is None else ((-cur["val_acc"][0]) if task == "image" else cur["val_loss"][0])
        if cur is None or (math.isfinite(key) and not (key >= cur_key)):
            best[row["spec"]] = row
    return {"task": task, "rows": rows, "best": best}


def markdown_table(agg: dict) -> str:
    task, best = agg["task"], agg["best"]
    ref = best.get("muon") or next(iter(best.values()))
    ref_ms = ref["ms_per_step"][0]
    metric = "val ppl" if task == "lm" else "val acc (%)"
    lines = [
        f"| optimizer | lr | seeds | val loss | {metric} | ms/step | time vs {ref['spec']} | mean alpha |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec, row in best.items():
        if task == "lm":
            m = fmt(*row["val_ppl"], digits=2)
        else:
            a = row["val_acc"]
            m = fmt(a[0] * 100, a[1] * 100 if a[1] is not None else None, digits=2)
        ms = row["ms_per_step"][0]
        rel = f"{ms / ref_ms:.2f}x" if ms and ref_ms else "-"
        lines.append(
            f"| {spec} | {row['lr']:g} | {row['n']} | {fmt(*row['val_loss'], digits=4)} | {m} | "
            f"{fmt(*row['ms_per_step'], digits=1)} | {rel} | {fmt(*row['mean_alpha'], digits=3)} |"
        )
    if len(agg["rows"]) > len(best):
        lines += [
            "",
            "All learning rates (best per optimizer in bold):",
            "",
            "| optimizer | lr | val loss |",
            "|---|---|---|",
        ]
        for row in sorted(agg["rows"], key=lambda r: (r["spec"], r["lr"])):
            cell = fmt(*row["val_loss"], digits=4)
            if best[row["spec"]] is row:
                cell = f"**{cell}**"
            lines.append(f"| {row['spec']} | {row['lr']:g} | {cell} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
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
    dev = f"{os.cpu_count()} CPU cores ({cpu}), torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        dev += f", GPU {torch.cuda.get_device_name(0)}"
    return f"{dev}; {platform.platform()}; torch {torch.__version__}; python {platform.python_version()}"


# ----------------------------------------------------------------------------- plots


def plot_curves(agg: dict, path: Path) -> None:
    import numpy as np

    from htmuon.train.loop import read_metrics

    fig, axes = _figure(1, 2)
    task = agg["task"]
    for spec, row in agg["best"].items():
        train_curves, val_curves = [], []
        for d in row["run_dirs"]:
            recs = read_metrics(Path(d) / "metrics.jsonl")
            train_curves.append({r["step"]: r["loss"] for r in recs if r["kind"] == "train"})
            key = "loss" if task == "lm" else "acc"
            val_curves.append({r["step"]: r[key] for r in recs if r["kind"] == "val"})
        for ax, curves in ((axes[0], train_curves), (axes[1], val_curves)):
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            y = np.array([[c[s] for s in steps] for c in curves], dtype=float)
            mean = y.mean(0)
            (line,) = ax.plot(steps, mean, label=f"{spec} (lr {row['lr']:g})", lw=1.5)
            if len(curves) > 1:
                sd = y.std(0, ddof=1)
                ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
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
            lines = [ln.get_ydata() for ln in ax.get_lines()]
            if lines:
                lo = min(float(np.min(y)) for y in lines)
                hi = max(float(np.percentile(y, 60)) for y in lines)
                if hi > lo:
                    ax.set_ylim(lo - 0.05 * (hi - lo), hi)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
        (line,) = ax.plot(steps, mean, label=f"{spec} (lr {row['lr']:g})", lw=1.5, marker="o", ms=3)
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


def _figure(rows: int, cols: int):
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        from htmuon.cli import UserError

        raise UserError("plots need matplotlib: pip install htmuon[plot] (or pass --no-plots)") from None
    fig = Figure(figsize=(5.5 * cols, 4 * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]


def _save(fig, path: Path) -> None:
    from htmuon.train.data import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def alpha_reports(agg: dict) -> dict | None:
    """Layer-wise ESD reports of each optimizer's final model (best lr, first seed), or None."""
    try:
        from htmuon.diagnostics import analyze
    except ImportError:
        return None
    # analyze runs under torch.no_grad() itself
    return {
        spec: analyze(_final_model(Path(row["run_dirs"][0])), fit="ks") for spec, row in agg["best"].items()
    }


def plot_alpha(reports: dict, path: Path) -> bool:
    try:
        from htmuon.diagnostics.plots import plot_layer_alpha
    except ImportError:
        return False
    plot_layer_alpha(reports, str(path))
    return True


# ----------------------------------------------------------------------------- entry point


def write_report(summaries, out: Path, name: str, command: str, wall_s: float, plots: bool = True) -> dict:
    from htmuon.train.data import atomic_write_bytes

    agg = aggregate(summaries)
    table = markdown_table(agg)
    files = []
    if plots:
        plot_curves(agg, out / "val_curves.png")
        files.append("val_curves.png")
        reports = alpha_reports(agg)
        if reports and plot_alpha(reports, out / "alpha.png"):
            files.append("alpha.png")
        if plot_alpha_curves(agg, out / "alpha_curves.png"):
            files.append("alpha_curves.png")
    cfg0 = json.loads((Path(summaries[0]["run_dir"]) / "config.json").read_text())
    train_s = sum(s.get("wall_s") or s["elapsed_s"] for s in summaries)
    md = [
        f"# htmuon compare: {name}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}",
        "",
        f"Wall time of this command: {wall_s / 60:.1f} min; training time of all {len(summaries)} runs "
        f"(steps and evaluations, summed; reused runs included): {train_s / 60:.1f} min.",
        "",
        f"Model {cfg0['model']}, data {cfg0['data']}, {cfg0['steps']} steps (warmup {cfg0['warmup_steps']}, "
        f"cosine to {cfg0['min_lr_ratio']}x), batch {cfg0['batch_size']}x{cfg0['grad_accum']}"
        + (f", seq_len {cfg0['seq_len']}" if agg["task"] == "lm" else "")
        + f", routing {cfg0['routing']}, weight decay {cfg0['weight_decay']}, "
        f"AdamW-part lr {cfg0['adamw_lr']:g}.",
        "",
        "Final validation metrics at the best lr per optimizer, mean ± sample std over seeds; "
        "ms/step is the median time of a training step, eval excluded (mean over seeds).",
        "",
        table,
    ]
    md += [f"![{f}]({f})" for f in files]
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode())
    serial = {
        "task": agg["task"],
        "best": {k: _jsonable(v) for k, v in agg["best"].items()},
        "rows": [_jsonable(r) for r in agg["rows"]],
        "runs": summaries,
        "command": command,
        "machine": machine(),
        "wall_s": wall_s,
    }
    atomic_write_bytes(out / "results.json", (json.dumps(serial, indent=2) + "\n").encode())
    return {"agg": agg, "table": table, "files": files}


def _jsonable(row: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cells, preset, out, name = plan_grid(args)
    out.mkdir(parents=True, exist_ok=True)
    summaries = run_grid(cells, preset)
    command = "htmuon " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = write_report(summaries, out, name, command, time.perf_counter() - t0, plots=not args.no_plots)
    print(report["table"])
    print(f"wrote {out / 'results.md'}" + "".join(f", {out / f}" for f in report["files"]))
    return 1 if all(s["diverged"] for s in summaries) else 0  # (a grid is never empty)
