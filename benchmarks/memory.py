"""Transient working memory of one optimizer step beyond params, grads and state (issue 11).

    PYTHONPATH=src python benchmarks/memory.py                          # LLaMA-135M matrix set
    PYTHONPATH=src python benchmarks/memory.py --models 60m 135m --layers 3
    PYTHONPATH=src python benchmarks/memory.py --paper-code /tmp/paper_htmuon/muon.py
    PYTHONPATH=src python benchmarks/memory.py --models 60m --accelerator-paths --chunk-bytes 512MiB

For each row of ``benchmarks/step_cost.py`` (same optimizers, same matrix set, fp32 parameters,
Gaussian gradients) it takes one warm-up step (the state -- momentum buffers -- is allocated
then), and measures the next step (for the interval rows: the next 5 steps, one corrected):

* **peak** -- the largest number of bytes allocated during the step above what was allocated
  before it. On CPU, torch keeps no allocator statistics, so the step runs under
  ``torch.profiler.profile(profile_memory=True)``; every allocation and free of torch's CPU
  allocator is an event with its size, and the peak is the maximum of their running sum in time
  order. It sees every tensor (including LAPACK work arrays, which torch allocates), not buffers
  that MKL / oneDNN allocate internally. On CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus the allocation before the step.
* **retained** -- bytes still allocated after the step (0 once the state exists).
* **RSS peak** (CPU, a cross-check) -- the rise of the process's peak resident set during the step
  (``/proc/self/clear_refs`` reset, ``VmHWM``): sees library-internal buffers too, but the C
  allocator's reuse of freed pages can hide part of the peak.

Bytes are reported in MiB and as a fraction of the parameter bytes (fp32 matrices), with the
issue's target: a step's peak within torch.optim.Muon's + 10% of the parameter bytes.

``--accelerator-paths`` (CPU) measures the code paths a GPU takes
(:func:`htmuon.spectral.accelerator_paths`: stacked chunks); pass the GPU's budget with
``--chunk-bytes`` (48MiB is the accelerator default since session 29, 512MiB before it).
torch.optim.Muon's row is its CPU step.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from htmuon.spectral import accelerator_paths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, header, require_torch_muon, write_json  # noqa: E402
from step_cost import (  # noqa: E402
    LR,
    MODELS,
    MOMENTUM,
    WEIGHT_DECAY,
    all_rows,
    chunk_bytes_arg,
    load_paper_module,
    matrix_set,
)

MIB = 2**20
TARGET_FRACTION = 0.10  # transient <= torch.optim.Muon's + 10% of the parameter bytes


def allocation_peak(events: list[tuple[int, int]]) -> tuple[int, int]:
    """(peak, final) of the running sum of ``(time, bytes)`` allocation events (frees negative), in time
    order, starting from 0; the peak is at least 0."""
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak, total


def profiler_allocations(prof) -> list[tuple[int, int]]:
    """Every CPU allocation (+bytes) and free (-bytes) a profiler run recorded, as ``(time_ns, bytes)``."""
    out: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            out.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    return out


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(opt, steps: int, device: torch.device) -> dict:
    """Peak/retained transient bytes of ``steps`` consecutive ``opt.step()`` calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return dict(peak=peak, retained=torch.cuda.memory_allocated(device) - before, rss_peak=None)
    rss_ok = reset_rss_peak()
    rss_before = rss_kib("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            opt.step()
    rss_peak = (rss_kib("VmHWM") - rss_before) * 1024 if rss_ok else None
    peak, final = allocation_peak(profiler_allocations(prof))
    return dict(peak=peak, retained=final, rss_peak=rss_peak)


def run_model(model: str, rows, args, device: torch.device) -> dict:
    shapes = matrix_set(model, args.routing, args.layers)
    param_bytes = 4 * sum(a * b for a, b in shapes)
    g = torch.Generator().manual_seed(args.seed)
    grads = [torch.randn(s, generator=g) for s in shapes]
    out = []
    for row in rows:  # one optimizer at a time, so that nothing else is allocated meanwhile
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for prm, G in zip(params, grads):
            prm.grad = G.to(device, copy=True)
        opt = row.make(params, LR, MOMENTUM, WEIGHT_DECAY)
        opt.step()  # warm-up: the state is allocated here
        r = measure(opt, row.steps, device)
        r.update(key=row.key, label=row.label, steps=row.steps)
        out.append(r)
        del opt, params
    return dict(model=model, matrices=len(shapes), param_bytes=param_bytes, rows=out)


def print_table(res: dict) -> None:
    pb = res["param_bytes"]
    muon = next(r for r in res["rows"] if r["key"] == "muon")["peak"]
    limit = muon + TARGET_FRACTION * pb
    print(
        f"\n## {res['model']}: {res['matrices']} matrices, parameters {pb / MIB:.0f} MiB (fp32); "
        f"target: peak <= Muon's + {TARGET_FRACTION:.0%} of the parameters = {limit / MIB:.0f} MiB\n"
    )
    print("| row | peak MiB | peak / param bytes | x Muon | retained MiB | RSS peak MiB | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in res["rows"]:
        rss = "-" if r["rss_peak"] is None else f"{r['rss_peak'] / MIB:.0f}"
        ratio = r["peak"] / muon if muon > 0 else float("nan")
        met = "met" if r["peak"] <= limit else "NOT met"
        print(
            f"| {r['label']} | {r['peak'] / MIB:.1f} | {r['peak'] / pb:.3f} | {ratio:.1f} | "
            f"{r['retained'] / MIB:.1f} | {rss} | {met} |",
            flush=True,
        )


def main() -> None:
    require_torch_muon()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["135m"], choices=list(MODELS))
    parser.add_argument("--rows", nargs="+", default=None, help="row keys (default all; muon always)")
    parser.add_argument("--routing", default="standard", choices=("standard", "paper"))
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the model's)")
    parser.add_argument("--paper-code", default=None, help="path of the paper's muon.py (outside this repo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--chunk-bytes", type=chunk_bytes_arg, default="auto", help="HTMuon rows' chunk_bytes: auto or bytes"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's)")
    parser.add_argument(
        "--accelerator-paths", action="store_true", help="CPU: take the code paths a GPU takes (see above)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="results/memory.json", help="where to write the numbers")
    args = parser.parse_args()
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = all_rows(
        load_paper_module(args.paper_code, args.device) if args.paper_code else None, args.chunk_bytes
    )
    if args.rows is not None:
        known = {r.key for r in rows}
        if set(args.rows) - known:
            parser.error(f"unknown --rows {sorted(set(args.rows) - known)}; valid: {sorted(known)}")
        rows = [r for r in rows if r.key == "muon" or r.key in args.rows]
    info = describe(args.device)
    print(header(info))
    start = time.perf_counter()
    results = []
    with accelerator_paths() if args.accelerator_paths else contextlib.nullcontext():
        for model in args.models:
            res = run_model(model, rows, args, device)
            print_table(res)
            results.append(res)
    info["elapsed_s"] = time.perf_counter() - start
    if args.json:
        write_json(args.json, dict(machine=info, args=vars(args), results=results))
        print(f"\n# {info['elapsed_s']:.0f} s; numbers in {args.json}")


if __name__ == "__main__":
    main()
