"""Per-shape time of the spectral backends against torch.optim.Muon's own Newton--Schulz, and the
matmul share of the ``"fast"`` backend's time.

    PYTHONPATH=src python benchmarks/fast_speed.py                       # LLaMA-60M shapes, 1 thread
    PYTHONPATH=src python benchmarks/fast_speed.py --shapes 768x768 768x2048 2048x768 --repeats 9
    PYTHONPATH=src python benchmarks/fast_speed.py --profile            # + torch.profiler matmul share

The reference is ``torch.optim.Muon``'s orthogonalisation (``torch.optim._muon.
_zeropower_via_newtonschulz``: 5 quintic steps in bfloat16, what ``torch.optim.Muon.step`` runs per
matrix). Each backend is timed through :func:`htmuon.spectral_power` on one float32 matrix, with
the working dtype named in the column (``fast bf16`` = ``ns_dtype=torch.bfloat16``). Calls are
interleaved round-robin (``--repeats`` rounds after a warm-up, median kept) in one process, one torch
thread by default. The machine header (CPU model, matmul ISA, torch) is printed first.

``--profile`` runs ``torch.profiler`` over a few calls of ``fast`` (bf16 and fp32 work) per shape and
prints the share of CPU self time spent in matrix products (``mm``/``bmm``/``addmm``/``baddbmm``/
``matmul`` kernels) against elementwise and other work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

try:
    from torch.optim._muon import _zeropower_via_newtonschulz
except ImportError:  # torch < 2.9: main() says so
    _zeropower_via_newtonschulz = None

from htmuon import MUON_NS5_COEFFICIENTS, spectral_power
from htmuon.spectral import cpu_matmul_flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, header, require_torch_muon, time_rounds  # noqa: E402

DEFAULT_SHAPES = ["512x512", "512x1376", "1376x512"]
#: (column label, method, working dtype)
VARIANTS = [
    ("fast bf16", "fast", torch.bfloat16),
    ("fast fp32", "fast", torch.float32),
    ("fast5 bf16", "fast5", torch.bfloat16),
    ("fast5 fp32", "fast5", torch.float32),
    ("eigh (fp64 Gram)", "eigh", None),
]
MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addmm_", "aten::baddbmm_")


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved round-robin after one warm-up call; the
    order rotates each round (the reference is not always first, nor a variant always after it)."""
    for f in fns.values():
        f()
    return {k: statistics.median(v) for k, v in time_rounds(fns, repeats).items()}


def matmul_share(fn, calls: int = 3) -> tuple[float, list[tuple[str, float]]]:
    """Share of CPU self time in matrix-product kernels over ``calls`` calls, and the top ops."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in rows)
    mm = sum(t for k, t in rows if k in MATMUL_OPS)
    top = sorted(rows, key=lambda r: -r[1])[:6]
    return mm / total, [(k, t / total) for k, t in top]


def main() -> None:
    require_torch_muon()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="matrices as MxN")
    parser.add_argument("--p", type=float, default=0.125)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--profile", action="store_true", help="also print the matmul share of 'fast'")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = cpu_matmul_flags()
    print(header(describe()))
    print(f"# fast bfloat16 matmul flags: {', '.join(sorted(flags)) or 'none'}")
    labels = [label for label, _, _ in VARIANTS]
    print(f"ms per call, and x torch.optim.Muon's NS5 (bf16) on the same matrix; p = {args.p}")
    print("| shape | Muon NS5 bf16 (ms) | " + " | ".join(labels) + " |")
    print("|---|---:|" + "---:|" * len(labels))
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        G = torch.randn(m, n, generator=g)
        fns = {"muon": lambda G=G: _zeropower_via_newtonschulz(G, MUON_NS5_COEFFICIENTS, 5, 1e-7)}
        for label, method, dtype in VARIANTS:
            opts = {} if dtype is None else {"ns_dtype": dtype}
            fns[label] = lambda G=G, meth=method, opts=opts: spectral_power(G, args.p, method=meth, **opts)
        t = timed(fns, args.repeats)
        cells = [f"{1e3 * t[label]:.1f} ms = {t[label] / t['muon']:.2f}x" for label in labels]
        print(f"| {shape} | {1e3 * t['muon']:.1f} | " + " | ".join(cells) + " |", flush=True)
    if args.profile:
        print("\nmatmul share of CPU self time (torch.profiler), top ops")
        for shape in args.shapes:
            m, n = (int(v) for v in shape.split("x"))
            G = torch.randn(m, n, generator=g)
            for dtype in (torch.bfloat16, torch.float32):
                share, top = matmul_share(
                    lambda G=G, dtype=dtype: spectral_power(G, args.p, method="fast", ns_dtype=dtype)
                )
                tops = ", ".join(f"{k} {100 * v:.0f}%" for k, v in top)
                print(f"{shape} fast {str(dtype)[6:]}: matmul {100 * share:.0f}% ({tops})", flush=True)


if __name__ == "__main__":
    main()
