"""Optimizer step cost against torch.optim.Muon on the LLaMA-60M / LLaMA-135M matrix sets (issue 11).

    PYTHONPATH=src python benchmarks/step_cost.py                                  # the default run
    PYTHONPATH=src python benchmarks/step_cost.py --paper-code /tmp/paper_htmuon/muon.py
    PYTHONPATH=src python benchmarks/step_cost.py --models 60m --rounds 5 --budget-s 0

What is timed: ``opt.step()`` on every hidden matrix of the model at once (``layers`` x (q, k, v,
o: h x h; gate, up: i x h; down: h x i), the paper's shapes; ``--routing paper`` adds the 32000 x h
embedding and LM head), float32 parameters, fixed Gaussian gradients, lr 0.02, momentum 0.95,
weight decay 0.1, one torch thread (``--threads``). Every optimizer takes one warm-up step (state
allocation), then the rows are timed interleaved round-robin (the order rotates each round). With
``--pairing adjacent`` (the default) every row is timed next to its own torch.optim.Muon steps (as
many steps as the row takes; Muon first in even rounds, last in odd ones), and its ratio in a round
is to those: on a shared host whose speed drifts (Muon's own step on the LLaMA-60M set varied
0.75-1.56 s within one run on an AMX Xeon: BENCHMARKS.md §A-5) the two runs of a ratio are seconds
apart, not a round. ``--pairing round``: the ratio is to the Muon row of the same round.
The table gives the median over rounds of the per-round ratio and its min-max spread, in CPU time
(``time.process_time``: what the step costs, whatever else runs on the machine) and wall time.

Rows (``--rows`` picks some; keys in brackets):
  [muon]       torch.optim.Muon: bfloat16 Newton--Schulz (5 quintic steps), the reference
  [p0]         HTMuon p=0, method="ns": HTMuon's own Muon step (NS5 in ns_dtype="auto")
  [default]    HTMuon() defaults: method="auto", ns_dtype="auto"
  [fast_fp32]  method="fast", ns_dtype=float32     [fast_bf16] method="fast", ns_dtype=bfloat16
  [fast5]      method="fast5" (ns_dtype="auto")
  [eigh], [svd] the exact backends
  [interval5]  HTMuon(interval=5) (default method): 5 consecutive steps per round, one corrected and
               four plain Muon steps, reported per step
  [paper], [paper_interval5]  only with ``--paper-code PATH``: the paper's own optimizer file
               (muon.py of github.com/TDCSZ327/HTmuon, kept OUTSIDE this repository), classes
               HTMuonWithAuxAdam (float32 SVD per matrix) and HTMuonIntervalWithAuxAdam(interval=5),
               power 0.125; they need torch.distributed, so a 1-process gloo group is started

Errors (``--no-errors`` skips them): relative Frobenius error of each row's direction against float64
exact ``U S^p V^T`` (p = 0 rows: the exact polar factor), the largest over one matrix of each shape
with a power-law spectrum ``s_k = k^-a`` spanning [1e-3, 1] of s_max; the direction is read off one
step of a fresh optimizer with lr 1, momentum 0 and no weight decay from a zero parameter.

``--budget-s`` (default 540) bounds the whole run: a model stops starting rounds when the next would
end past its share of the budget (shares by parameter count), keeping at least one timed round, so
the default run ends within ~10 minutes once the rows are near Muon's cost (on slow code it keeps
one round). ``--json`` writes every per-round time; the printed header names the CPU, its matmul ISA
and the torch version.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from htmuon import HTMuon  # noqa: E402
from machine import describe, header, require_torch_muon, write_json  # noqa: E402

MODELS = {
    # hidden, intermediate, layers (arXiv 2603.10067); vocabulary 32000
    "60m": (512, 1376, 8),
    "135m": (768, 2048, 12),
}
VOCAB = 32000
LR, MOMENTUM, WEIGHT_DECAY = 0.02, 0.95, 0.1
P = 0.125
INTERVAL = 5
PAPER_POWER = 0.125
#: The issue-11 targets: (row key, largest ratio to torch.optim.Muon, largest power-law error or None).
TARGETS = (
    ("default", 1.3, None),
    ("fast_fp32", 1.3, 0.02),
    ("fast_bf16", 1.3, 0.06),
    ("fast5", 1.1, None),
    ("interval5", 1.1, None),
)
PAPER_SPEEDUP_TARGET = 4.0  # HTMuon default >= 4x faster than the paper's HTMuon-SVD code

Factory = Callable[[list[torch.Tensor], float, float, float], torch.optim.Optimizer]


@dataclass
class Row:
    key: str
    label: str
    make: Factory  # (params, lr, momentum, weight_decay) -> optimizer
    steps: int = 1  # consecutive steps timed per round
    exact_p: float | None = P  # the map the direction approximates: s^p (0: polar; None: no error)


def htmuon_row(key: str, label: str, steps: int = 1, **kw) -> Row:
    def make(params, lr, momentum, wd):
        return HTMuon(params, lr=lr, momentum=momentum, weight_decay=wd, **kw)

    return Row(key, label, make, steps, None if steps > 1 else kw.get("p", P))


def muon_row() -> Row:
    def make(params, lr, momentum, wd):
        return torch.optim.Muon(params, lr=lr, momentum=momentum, weight_decay=wd)

    return Row("muon", "torch.optim.Muon (bf16 NS5)", make, 1, 0.0)


def load_paper_module(path: str, device: str = "cpu"):
    """Import the paper's optimizer file (muon.py of TDCSZ327/HTmuon) from ``path`` (file or folder); a
    one-process group for its all_gather: nccl on CUDA, gloo on CPU."""
    file = Path(path)
    if file.is_dir():
        file = file / "muon.py"
    if not file.is_file():
        raise SystemExit(f"--paper-code: no such file: {file}")
    spec = importlib.util.spec_from_file_location("paper_htmuon_muon", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("HTMuonWithAuxAdam", "HTMuonIntervalWithAuxAdam"):
        if not hasattr(module, name):
            raise SystemExit(f"--paper-code: {file} has no class {name}")
    import torch.distributed as dist

    if not dist.is_initialized():  # their step calls dist.get_world_size() / all_gather
        store = tempfile.NamedTemporaryFile(prefix="paper_htmuon_store_", delete=False).name
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    return module


def paper_rows(module) -> list[Row]:
    def group(params, lr, momentum, wd):
        return [dict(params=list(params), use_muon=True, lr=lr, momentum=momentum, weight_decay=wd)]

    def svd(params, lr, momentum, wd):
        return module.HTMuonWithAuxAdam(group(params, lr, momentum, wd), PAPER_POWER)

    def interval(params, lr, momentum, wd):
        return module.HTMuonIntervalWithAuxAdam(group(params, lr, momentum, wd), PAPER_POWER, INTERVAL)

    return [
        Row("paper", "paper code, HTMuonWithAuxAdam (fp32 SVD)", svd, 1, PAPER_POWER),
        Row(
            "paper_interval5", f"paper code, HTMuonIntervalWithAuxAdam({INTERVAL})", interval, INTERVAL, None
        ),
    ]


def chunk_bytes_arg(text: str) -> int | str:
    """``--chunk-bytes``: "auto" or a number of bytes (``33554432``, or ``32MiB``)."""
    if text == "auto":
        return text
    if text.lower().endswith("mib"):
        return int(text[:-3]) * 2**20
    return int(text)


def all_rows(paper_module=None, chunk_bytes: int | str = "auto") -> list[Row]:
    """Every row; ``chunk_bytes`` goes to each HTMuon row (BENCHMARKS.md §A-7's left half: 32 MiB)."""
    rows = [
        muon_row(),
        htmuon_row("p0", "HTMuon p=0 (own NS5, ns_dtype auto)", p=0.0, method="ns", chunk_bytes=chunk_bytes),
        htmuon_row("default", "HTMuon default (auto, auto)", chunk_bytes=chunk_bytes),
        htmuon_row(
            "fast_fp32", "fast, ns_dtype fp32", method="fast", ns_dtype=torch.float32, chunk_bytes=chunk_bytes
        ),
        htmuon_row(
            "fast_bf16",
            "fast, ns_dtype bf16",
            method="fast",
            ns_dtype=torch.bfloat16,
            chunk_bytes=chunk_bytes,
        ),
        htmuon_row("fast5", "fast5 (ns_dtype auto)", method="fast5", chunk_bytes=chunk_bytes),
        htmuon_row("eigh", "eigh", method="eigh", chunk_bytes=chunk_bytes),
        htmuon_row("svd", "svd", method="svd", chunk_bytes=chunk_bytes),
        htmuon_row(
            "interval5",
            f"interval={INTERVAL} (default method, {INTERVAL}-step run)",
            INTERVAL,
            interval=INTERVAL,
            chunk_bytes=chunk_bytes,
        ),
    ]
    if paper_module is not None:
        rows += paper_rows(paper_module)
    return rows


# ------------------------------------------------------------------ matrices


def matrix_set(model: str, routing: str = "standard", layers: int | None = None) -> list[tuple[int, int]]:
    """The (out, in) shapes of every matrix HTMuon updates in the model."""
    h, i, depth = MODELS[model]
    per_block = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]
    once = [(VOCAB, h), (VOCAB, h)] if routing == "paper" else []
    return per_block * (depth if layers is None else layers) + once


def power_law_matrix(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A float64 matrix with singular values ``k^-a`` spanning [1e-3, 1] and random singular vectors."""
    m, n = shape
    k = min(m, n)
    a = 3.0 / math.log10(k)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64).pow(-a)
    return (U * s) @ V.T


def exact_map(G: torch.Tensor, p: float) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    return (U * s.pow(p)) @ Vh


def direction_error(row: Row, G: torch.Tensor, device: torch.device) -> float:
    """Relative error of the direction ``row`` applies to G vs the exact map (one step, lr 1, from 0)."""
    m, n = G.shape
    param = torch.nn.Parameter(torch.zeros(m, n, device=device))
    param.grad = G.float().to(device)
    row.make([param], 1.0, 0.0, 0.0).step()
    O = -param.detach().double().cpu() / math.sqrt(max(1.0, m / n))  # every row scales by Muon's rule
    R = exact_map(G, row.exact_p)
    return ((O - R).norm() / R.norm()).item()


# ------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(opt: torch.optim.Optimizer, steps: int, device: torch.device) -> tuple[float, float]:
    """(CPU, wall) seconds per step of ``steps`` consecutive ``opt.step()`` calls, device synced."""
    sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync(device)
    return (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps


def run_model(model: str, rows: list[Row], args, device: torch.device, deadline: float) -> dict:
    shapes = matrix_set(model, args.routing, args.layers)
    g = torch.Generator().manual_seed(args.seed)
    params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
    for prm in params:
        prm.grad = torch.randn(prm.shape, generator=g).to(device)
    opts = {}
    for row in rows:
        if row.key.startswith("paper"):  # the paper's step modifies the gradients in place: own copies
            own = [torch.nn.Parameter(prm.detach().clone()) for prm in params]
            for o, prm in zip(own, params):
                o.grad = prm.grad.clone()
            opts[row.key] = row.make(own, LR, MOMENTUM, WEIGHT_DECAY)
        else:
            opts[row.key] = row.make(params, LR, MOMENTUM, WEIGHT_DECAY)
    t_start = time.perf_counter()
    for row in rows:  # warm-up: state allocation, first-call kernel setup
        opts[row.key].step()
    sync(device)
    warmup_s = time.perf_counter() - t_start

    cpu: dict[str, list[float]] = {r.key: [] for r in rows}
    wall: dict[str, list[float]] = {r.key: [] for r in rows}
    # --pairing adjacent: each row's own torch.optim.Muon steps, timed right before (even rounds) or
    # after (odd rounds) it, so its ratio compares two runs seconds apart, not a whole round apart
    ref_cpu: dict[str, list[float]] = {r.key: [] for r in rows}
    ref_wall: dict[str, list[float]] = {r.key: [] for r in rows}
    muon_row = next(r for r in rows if r.key == "muon")

    rounds = 0
    while rounds < args.rounds:
        t_round = time.perf_counter()
        order = rows[rounds % len(rows) :] + rows[: rounds % len(rows)]
        for row in order:
            if args.pairing == "round" or row.key == "muon":
                c, w = timed(opts[row.key], row.steps, device)
                cpu[row.key].append(c)
                wall[row.key].append(w)
                continue
            pair = [(muon_row, row.key), (row, None)]  # the reference takes as many steps as the row
            for r, ref_of in pair if rounds % 2 == 0 else pair[::-1]:
                c, w = timed(opts[r.key], row.steps, device)
                (ref_cpu[ref_of] if ref_of else cpu[row.key]).append(c)
                (ref_wall[ref_of] if ref_of else wall[row.key]).append(w)
        rounds += 1
        last = time.perf_counter() - t_round
        if args.budget_s > 0 and time.perf_counter() + last > deadline:
            break
    del opts

    errors: dict[str, float] = {}
    if args.errors:
        ge = torch.Generator().manual_seed(args.seed + 1)
        distinct = sorted(set(shapes), key=shapes.index)
        mats = [power_law_matrix(s, ge) for s in distinct]
        for row in rows:
            if row.exact_p is not None:  # interval rows: one step says nothing about the schedule
                errors[row.key] = max(direction_error(row, G, device) for G in mats)

    out_rows = []
    ratios = {}
    for row in rows:
        paired = args.pairing == "adjacent" and row.key != "muon"
        ratios[row.key] = (
            [c / m for c, m in zip(cpu[row.key], ref_cpu[row.key] if paired else cpu["muon"])],
            [w / m for w, m in zip(wall[row.key], ref_wall[row.key] if paired else wall["muon"])],
        )
    for row in rows:
        paired = args.pairing == "adjacent" and row.key != "muon"
        r_cpu, r_wall = ratios[row.key]
        entry = dict(
            key=row.key,
            label=row.label,
            steps_per_round=row.steps,
            cpu_s=cpu[row.key],
            wall_s=wall[row.key],
            muon_cpu_s=ref_cpu[row.key] if paired else None,
            ratio_cpu=r_cpu,
            ratio_wall=r_wall,
            ratio_cpu_median=statistics.median(r_cpu),
            ratio_wall_median=statistics.median(r_wall),
            error_power_law=errors.get(row.key),
        )
        if "p0" in cpu:
            entry["ratio_p0_cpu_median"] = statistics.median(a / b for a, b in zip(r_cpu, ratios["p0"][0]))
        out_rows.append(entry)
    n_params = sum(a * b for a, b in shapes)
    return dict(
        model=model,
        matrices=len(shapes),
        matrix_params=n_params,
        rounds=rounds,
        warmup_s=warmup_s,
        rows=out_rows,
    )


# ------------------------------------------------------------------ report


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "-"


def print_table(res: dict) -> None:
    print(
        f"\n## {res['model']}: {res['matrices']} matrices, {res['matrix_params'] / 1e6:.1f}M parameters, "
        f"{res['rounds']} round(s) after a warm-up step (warm-up {res['warmup_s']:.0f} s)\n"
    )
    print(
        "| row | CPU ms / step | wall ms / step | x Muon (CPU) | spread (CPU) | x Muon (wall) "
        "| x HTMuon p=0 (CPU) | err power-law |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in res["rows"]:
        err = "-" if r["error_power_law"] is None else f"{100 * r['error_power_law']:.2f}%"
        p0 = r.get("ratio_p0_cpu_median")
        print(
            f"| {r['label']} | {1e3 * statistics.median(r['cpu_s']):.0f} | "
            f"{1e3 * statistics.median(r['wall_s']):.0f} | {r['ratio_cpu_median']:.2f} | "
            f"{spread(r['ratio_cpu'])} | {r['ratio_wall_median']:.2f} | "
            f"{'-' if p0 is None else f'{p0:.2f}'} | {err} |",
            flush=True,
        )


def target_verdicts(res: dict, clock: str = "cpu") -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the issue-11 targets present in a model's result, on the ratios of
    ``clock``: "cpu" (process time, the CPU runs) or "wall" (on a GPU, where the host's process time
    is not the step's cost)."""
    by_key = {r["key"]: r for r in res["rows"]}
    median = f"ratio_{clock}_median"
    out = []
    for key, limit, err_limit in TARGETS:
        r = by_key.get(key)
        if r is None:
            continue
        ratio = r[median]
        text, met = f"{ratio:.2f}x", ratio <= limit
        target = f"{r['label']} <= {limit}x Muon"
        if err_limit is not None and r["error_power_law"] is not None:
            target += f", error <= {100 * err_limit:.0f}%"
            text += f", error {100 * r['error_power_law']:.2f}%"
            met = met and r["error_power_law"] <= err_limit
        out.append((target, text, met))
    if "paper" in by_key and "default" in by_key:
        speedup = by_key["paper"][median] / by_key["default"][median]
        out.append(
            (
                f"default >= {PAPER_SPEEDUP_TARGET:.0f}x faster than the paper's code",
                f"{speedup:.2f}x",
                speedup >= PAPER_SPEEDUP_TARGET,
            )
        )
    return out


def main() -> None:
    require_torch_muon()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rows", nargs="+", default=None, help="row keys (default all; muon always)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds at most (default 3)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall budget, 0: none")
    parser.add_argument("--routing", default="standard", choices=("standard", "paper"))
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the model's)")
    parser.add_argument("--paper-code", default=None, help="path of the paper's muon.py (outside this repo)")
    parser.add_argument("--no-errors", dest="errors", action="store_false", help="skip the error column")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--chunk-bytes", type=chunk_bytes_arg, default="auto", help="HTMuon rows' chunk_bytes: auto or bytes"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pairing",
        default="adjacent",
        choices=("adjacent", "round"),
        help="adjacent (default): each row's ratio is to torch.optim.Muon steps timed right next to it; "
        "round: to the Muon row of the same round",
    )
    parser.add_argument("--json", default="results/step_cost.json", help="where to write the per-round data")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    paper = load_paper_module(args.paper_code, args.device) if args.paper_code else None
    rows = all_rows(paper, args.chunk_bytes)
    if args.rows is not None:
        known = {r.key for r in rows}
        bad = set(args.rows) - known
        if bad:
            parser.error(f"unknown --rows {sorted(bad)}; valid: {sorted(known)}")
        rows = [r for r in rows if r.key == "muon" or r.key in args.rows]

    info = describe(args.device)
    print(header(info))
    print(
        f"# {len(rows)} rows, fp32 parameters, Gaussian gradients, lr {LR}, momentum {MOMENTUM}, "
        f"weight decay {WEIGHT_DECAY}, p {P}; ratios: median over rounds of the per-round ratio"
        + (" to torch.optim.Muon timed adjacent to each row" if args.pairing == "adjacent" else "")
    )
    start = time.perf_counter()
    sizes = {m: sum(a * b for a, b in matrix_set(m, args.routing, args.layers)) for m in args.models}
    results, used = [], 0.0
    for model in args.models:
        share = sizes[model] / sum(sizes.values())
        used += share
        deadline = start + args.budget_s * used
        res = run_model(model, rows, args, device, deadline)
        print_table(res)
        clock = "wall" if device.type == "cuda" else "cpu"
        verdicts = target_verdicts(res, clock)
        if verdicts:
            print(f"\n| target | measured ({'wall' if clock == 'wall' else 'CPU'}) | met |\n|---|---|---|")
            for target, text, met in verdicts:
                print(f"| {target} | {text} | {'met' if met else 'NOT met'} |")
        res["targets"] = [dict(target=t, measured=x, met=m) for t, x, m in verdicts]
        results.append(res)
    info["elapsed_s"] = time.perf_counter() - start
    if args.json:
        payload = dict(machine=info, args=vars(args), results=results)
        write_json(args.json, payload)
        print(f"\n# {info['elapsed_s']:.0f} s; per-round data in {args.json}")


if __name__ == "__main__":
    main()
