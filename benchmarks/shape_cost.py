"""Per-shape cost of the spectral maps against Muon's NS5, and CPU bfloat16 vs float32 matmul cost.

    PYTHONPATH=src python benchmarks/shape_cost.py                     # the LLaMA-135M batches
    PYTHONPATH=src python benchmarks/shape_cost.py --shapes 4x512x512 2x1376x512 1x512x1376
    PYTHONPATH=src python benchmarks/shape_cost.py --matmul            # bf16 vs fp32 matmul only
    PYTHONPATH=src python benchmarks/shape_cost.py --batched --shapes 4x512x512 2x512x1376

``benchmarks/step_cost.py`` times whole ``HTMuon.step()`` calls; this script isolates the spectral
map: for each batch shape ``BxMxN`` it times ``polar(X)`` (Muon's NS5, float32) and
``spectral_power(X, p, method=...)`` for each method, interleaved round-robin in one process
(``--repeats`` rounds, median kept), and prints the ratio to that float32 NS5's time (HTMuon's own
``polar``: not torch.optim.Muon, whose NS5 works in bfloat16; ``fast_speed.py`` and ``step_cost.py``
compare with that). ``--matmul`` times one
``(m x m) @ (m x n)`` product in float32 and in bfloat16 on the current device: on AVX2-only CPUs
bfloat16 is 30-180x slower, on AVX-512-BF16 / AMX CPUs several times faster (the header names the
CPU's matmul ISA). ``--batched`` times, for each batch shape, the Gram matrices ``X X^T`` as one
``bmm`` against a loop of per-matrix ``mm`` (what :func:`htmuon.spectral.gram` does on the eager CPU
path, where a small batched product was up to 5x slower on an AMX Xeon; compiled steps and
accelerators take the ``bmm``), in float32 and bfloat16. Times are CPU time of the process
(``time.process_time``, robust to other jobs on a shared machine), each call repeated until it
lasts >= 20 ms. One torch thread by default, as in step_cost.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from htmuon import polar, spectral_power  # noqa: E402
from machine import describe, header  # noqa: E402

# LLaMA-135M (hidden 768, intermediate 2048): q/k/v/o batched, gate/up (tall) batched, down (wide)
DEFAULT_SHAPES = ["4x768x768", "2x2048x768", "1x768x2048"]


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds per call of each function, interleaved round-robin after a warm-up call;
    a short function is called ``n`` times per measurement so that each lasts >= 20 ms."""
    calls = {}
    for k, f in fns.items():  # warm-up, and the calls per measurement
        t0 = time.process_time()
        f()
        calls[k] = max(1, min(1000, int(0.02 / max(time.process_time() - t0, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.process_time()
            for _ in range(calls[k]):
                f()
            times[k].append((time.process_time() - t0) / calls[k])
    return {k: statistics.median(v) for k, v in times.items()}


def batched_row(shape: str, dtype: torch.dtype, loop_s: float, bmm_s: float) -> str:
    """One row of the ``--batched`` table: the shape, the dtype, both times in ms and ``bmm / loop``."""
    name = str(dtype).removeprefix("torch.")
    return f"| {shape} | {name} | {1e3 * loop_s:.2f} | {1e3 * bmm_s:.2f} | {bmm_s / loop_s:.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batches as BxMxN")
    parser.add_argument("--methods", nargs="+", default=["fast", "fast5"])
    parser.add_argument("--p", type=float, default=0.125)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--matmul", action="store_true", help="only time fp32 vs bf16 matmuls")
    parser.add_argument("--batched", action="store_true", help="only time bmm vs per-matrix mm Gram matrices")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(header(describe()) + f", median of {args.repeats}")
    if args.matmul:
        print("| product | float32 ms | bfloat16 ms | bf16 / fp32 |")
        print("|---|---:|---:|---:|")
        for m, n in ((256, 256), (512, 1376), (768, 2048)):
            ops = {
                dt: (torch.randn(m, m, dtype=dt), torch.randn(m, n, dtype=dt))
                for dt in (torch.float32, torch.bfloat16)
            }
            t = timed({dt: (lambda a=a, b=b: a @ b) for dt, (a, b) in ops.items()}, args.repeats)
            f32, b16 = t[torch.float32], t[torch.bfloat16]
            print(f"| {m}x{m} @ {m}x{n} | {1e3 * f32:.2f} | {1e3 * b16:.2f} | {b16 / f32:.2f}x |", flush=True)
        return
    if args.batched:
        print("| batch | dtype | per-matrix mm ms | bmm ms | bmm / per-matrix |")
        print("|---|---|---:|---:|---:|")
        for shape in args.shapes:
            B, m, n = (int(v) for v in shape.split("x"))
            for dt in (torch.float32, torch.bfloat16):
                X = torch.randn(B, m, n, generator=torch.Generator().manual_seed(0)).to(dt)
                out = X.new_empty(B, m, m)

                def looped(X=X, out=out):
                    for i in range(X.shape[0]):
                        torch.mm(X[i], X[i].T, out=out[i])

                t = timed({"loop": looped, "bmm": lambda X=X: torch.bmm(X, X.mT)}, args.repeats)
                print(batched_row(shape, dt, t["loop"], t["bmm"]), flush=True)
        return
    print("| batch | " + " | ".join(f"{m} ms | {m} x NS5 fp32" for m in args.methods) + " | NS5 fp32 ms |")
    print("|---|" + "---:|---:|" * len(args.methods) + "---:|")
    for shape in args.shapes:
        B, m, n = (int(v) for v in shape.split("x"))
        X = torch.randn(B, m, n, generator=torch.Generator().manual_seed(0))
        fns = {"muon": lambda X=X: polar(X, dtype=torch.float32)}
        for method in args.methods:
            fns[method] = lambda X=X, method=method: spectral_power(
                X, args.p, method=method, ns_dtype=torch.float32
            )
        t = timed(fns, args.repeats)
        cells = [f"{1e3 * t[k]:.0f} | {t[k] / t['muon']:.2f}" for k in args.methods]
        print(f"| {shape} | " + " | ".join(cells) + f" | {1e3 * t['muon']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
