"""The paper's diagnostic figures from the harness, as PNGs (matplotlib, the ``plot`` extra).

    python -m htmuon.train.figures --out figs --model llama-tiny --steps 100 --record 1,50,100 \\
        --optimizer muon --optimizer htmuon:method=svd,p=0 --optimizer htmuon

- ``update_spectra_SPEC.png`` (Fig. 1b-c): the singular values of a few layers' updates at chosen
  steps. The update is the optimizer's step direction ``(W_before (1 - lr wd) - W_after) / lr`` of
  each recorded matrix (weight decay taken out), so Muon-SVD's is exactly flat and Muon-NS's is not.
- ``layer_norms.png`` (Fig. 7): the layer-wise spectral and Frobenius norms of the final weights,
  one line per optimizer.
- ``interval_overhead.png`` (Figs. 5, 10): the time of an HTMuon step, amortised over steps, with
  the correction every k in {1, 5, 10, 25} steps, relative to Muon's step, on the model's matrices
  with fixed random gradients (``--no-overhead`` skips it).

Each figure's numbers are written beside it as JSON (``figures.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from htmuon.cli import UserError

#: Correction intervals of the paper's overhead figures (Figs. 5, 10).
PAPER_INTERVALS = (1, 5, 10, 25)
#: config keys that ``--set`` must not give: the command's own flags (or the folder it does not write)
OWN_FLAGS = {"model": "--model", "data": "--data", "steps": "--steps", "optimizer": "--optimizer",
             "out_dir": "--out"}  # fmt: skip


def matrix_params(model: nn.Module, layers: int = 0) -> list[tuple[str, nn.Parameter]]:
    """The model's hidden weight matrices (htmuon.routing's "matrix" kind, 2-D), in order; the
    first ``layers`` of them spread evenly over depth when ``layers`` > 0."""
    from htmuon.routing import classify_parameters

    mats = [(n, p) for n, p, kind in classify_parameters(model) if kind == "matrix" and p.ndim == 2]
    if layers and layers < len(mats):
        idx = sorted({round(i * (len(mats) - 1) / max(1, layers - 1)) for i in range(layers)})
        mats = [mats[i] for i in idx]
    return mats


class UpdateRecorder:
    """Singular values of the step direction of chosen matrices at chosen steps.

    Call :meth:`before` just before ``optimizer.step()`` and :meth:`after` just after; on a
    recorded step the direction ``(W (1 - lr wd) - W_new) / lr`` of each matrix (its group's lr and
    weight decay) is decomposed and its singular values kept in :attr:`spectra`
    (``{step: {name: tensor}}``, float64, descending).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[tuple[str, nn.Parameter]], steps):
        self.optimizer, self.params, self.steps = optimizer, params, set(steps)
        self.spectra: dict[int, dict[str, torch.Tensor]] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._group = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def before(self, step: int) -> None:
        if step in self.steps:
            self._before = {n: p.detach().clone() for n, p in self.params}

    def after(self, step: int) -> None:
        if step not in self.steps:
            return
        out = {}
        for name, p in self.params:
            g = self._group[id(p)]
            lr, wd = float(g["lr"]), float(g.get("weight_decay", 0.0))
            direction = (self._before[name].double() * (1 - lr * wd) - p.detach().double()) / lr
            out[name] = torch.linalg.svdvals(direction.cpu())
        self.spectra[step] = out
        self._before = {}


def layer_norms(model: nn.Module) -> list[dict]:
    """``[{"name", "spectral", "frobenius"}]`` of the model's hidden weight matrices, in order."""
    rows = []
    for name, p in matrix_params(model):
        w = p.detach().double().cpu()
        rows.append(
            {
                "name": name,
                "spectral": float(torch.linalg.matrix_norm(w, ord=2)),
                "frobenius": float(torch.linalg.matrix_norm(w)),
            }
        )
    return rows


def train_and_record(cfg, record_steps, layers: int = 3) -> tuple[dict, list[dict]]:
    """Train ``cfg`` (a TrainConfig; its optimizer, lr, schedule, steps) with the harness's data,
    model and optimizer, recording update spectra; returns (spectra, final layer norms)."""
    from htmuon.train.loop import (
        _loss,
        build_data_and_model,
        independent_weight_decay,
        lr_factor,
        pick_device,
        resolve_config,
        set_threads,
    )
    from htmuon.train.optimizers import build_optimizer
    from htmuon.train.presets import model_task

    cfg = resolve_config(cfg)
    set_threads(cfg.threads)
    device, amp = pick_device(cfg)
    data, model, _ = build_data_and_model(cfg)
    model.to(device).train()
    opt = build_optimizer(model, cfg)
    if cfg.wd_mode == "independent":  # as the loop does (the recorder reads each group's decay)
        independent_weight_decay(opt)
    recorder = UpdateRecorder(opt, matrix_params(model, layers), record_steps)
    base = [g["lr"] for g in opt.param_groups]
    task = model_task(cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(1, cfg.steps + 1):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        for _ in range(cfg.grad_accum):
            x, y = (t.to(device) for t in data.next_batch())
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, _ = _loss(model, task, x, y)
            (loss / cfg.grad_accum).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        recorder.before(step)
        opt.step()
        recorder.after(step)
        opt.zero_grad(set_to_none=True)
    return recorder.spectra, layer_norms(model)


def interval_overhead(model: nn.Module, intervals=PAPER_INTERVALS, steps: int = 50, repeats: int = 3) -> dict:
    """Seconds per step (amortised over ``steps``, median of ``repeats``) of Muon and of HTMuon
    (SVD and NS backends) with the correction every k steps, on the model's hidden matrices with
    fixed random gradients; ``{"muon": t, "htmuon-svd k=1": t, ...}``."""
    from htmuon import HTMuon

    mats = [p for _, p in matrix_params(model)]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in mats]
    configs = {"muon": dict(p=0.0, method="ns")}
    for method in ("svd", "ns"):
        for k in intervals:
            configs[f"htmuon-{method} k={k}"] = dict(p=0.125, method=method, interval=k)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):  # round-robin, so a busy machine slows every configuration alike
        for name, kw in configs.items():
            work = [nn.Parameter(p.detach().clone()) for p in mats]
            opt = HTMuon(work, lr=0.01, **kw)
            for w, gr in zip(work, grads):
                w.grad = gr
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("figures need matplotlib: pip install htmuon[plot]") from None
    return plt


def plot_spectra(spectra: dict, path: Path, title: str) -> None:
    """One panel per recorded layer: singular values / the largest, against rank, one line per step."""
    plt = _plt()
    steps = sorted(spectra)
    names = list(spectra[steps[0]])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for k, step in enumerate(steps):
            s = spectra[step][name]
            ax.plot(range(1, len(s) + 1), (s / s[0]).numpy(), color=f"C{k}", lw=1.4, label=f"step {step}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rank i")
        ax.set_ylabel("s_i / s_1")
        ax.set_title(name, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_norms(norms: dict[str, list[dict]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, (label, rows) in enumerate(norms.items()):
        for ax, key in zip(axes, ("spectral", "frobenius")):
            ax.plot([r[key] for r in rows], marker="o", ms=3, lw=1.2, color=f"C{k}", label=label)
    for ax, key in zip(axes, ("spectral norm", "Frobenius norm")):
        ax.set_xlabel("layer (hidden matrices, in order)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Layer-wise norms of the final weights", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_overhead(times: dict[str, float], path: Path) -> None:
    plt = _plt()
    ref = times["muon"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = list(times)
    ax.bar(range(len(labels)), [times[n] / ref for n in labels], color=["C7"] + ["C0"] * 4 + ["C1"] * 4)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("time per step / Muon's")
    ax.set_title("HTMuon step time vs correction interval k (amortised)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from htmuon.train.compare import parse_spec, safe_name, with_spec
    from htmuon.train.config import make_config
    from htmuon.train.loop import schedule_config
    from htmuon.train.models import build_lm

    ap = argparse.ArgumentParser(prog="python -m htmuon.train.figures", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the PNGs and figures.json")
    ap.add_argument(
        "--optimizer", action="append", help="an optimizer spec (repeat), e.g. htmuon:p=0,method=svd"
    )
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--data", default="auto")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument(
        "--record", default=None, help="steps whose updates are recorded (default: 1, steps / 2, steps)"
    )
    ap.add_argument("--layers", type=int, default=3, help="recorded matrices, spread over depth")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further config keys")
    ap.add_argument("--no-overhead", action="store_true")
    args = ap.parse_args(argv)
    try:
        specs = args.optimizer or ["muon", "htmuon:p=0,method=svd", "htmuon"]
        if args.record is None:
            args.record = ",".join(map(str, sorted({1, max(1, args.steps // 2), max(1, args.steps)})))
        try:
            record = sorted({int(s) for s in args.record.split(",") if s.strip()})
        except ValueError:
            raise UserError(f"--record takes comma-separated step numbers, got '{args.record}'") from None
        late = [s for s in record if not 1 <= s <= args.steps]
        if late or not record:
            raise UserError(
                f"--record steps must lie in 1..--steps ({args.steps}), got '{args.record}'"
                + (" (lower them or raise --steps)" if late else "")
            )
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        base = {"model": args.model, "data": args.data, "steps": str(args.steps)}
        # the command's default warmup, 10% of the steps a spec trains (a budget's too), rounded as the
        # loop rounds a fraction; as a preset's: --set or a spec may give either warmup key instead
        default = {"warmup_fraction": 0.1}
        for item in args.set:
            key, eq, value = item.partition("=")
            if not eq:
                raise UserError(f"--set expects KEY=VALUE, got '{item}'")
            flag = OWN_FLAGS.get(key.strip().replace("-", "_"))
            if flag:  # it would override the flag (steps: past the --record check) or be ignored
                raise UserError(f"--set {item}: {key} has its own flag, {flag}")
            base[key] = value
        from htmuon.train.presets import model_task

        if not args.no_overhead and model_task(args.model) != "lm":  # said before the training, not after
            raise UserError(
                f"the overhead figure is measured on a language model's matrices ('{args.model}' is an image "
                "model): pass --no-overhead"
            )
        result: dict = {"spectra": {}, "norms": {}}
        cfgs = {}
        trains = {}  # the steps each spec trains (train_and_record resolves a budget the same way)
        for spec in specs:  # every spec's config checked before the first one trains
            name, over = parse_spec(spec)
            cfg = make_config(default, None, {**with_spec(base, over), "optimizer": name}, strings=True)
            cfgs[spec] = dataclasses.replace(cfg, out_dir=str(out / "unused"))
            steps = schedule_config(cfg).steps  # a spec's own steps, or a budget (tokens_per_param)
            trains[spec] = steps
            if record[-1] > steps:  # no record of that step: a figure without it, or none at all
                raise UserError(
                    f"--record steps must lie in 1..{steps}, the steps {spec} trains, got '{args.record}'"
                )
        for spec, cfg in cfgs.items():
            print(f"training {spec} for {trains[spec]} steps ...", file=sys.stderr, flush=True)
            spectra, norms = train_and_record(cfg, record, args.layers)
            plot_spectra(
                spectra, out / f"update_spectra_{safe_name(spec)}.png", f"update singular values: {spec}"
            )
            result["spectra"][spec] = {s: {n: v.tolist() for n, v in d.items()} for s, d in spectra.items()}
            result["norms"][spec] = norms
        plot_layer_norms(result["norms"], out / "layer_norms.png")
        if not args.no_overhead:
            torch.manual_seed(0)
            times = interval_overhead(build_lm(args.model, 4096, 128))
            plot_overhead(times, out / "interval_overhead.png")
            result["overhead_s_per_step"] = times
        (out / "figures.json").write_text(json.dumps(result, indent=1) + "\n")
    except UserError as e:
        print(f"htmuon figures: error: {e}", file=sys.stderr)
        return 2
    print(f"figures written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
