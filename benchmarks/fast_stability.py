"""Worst cases of the "fast" backends in bfloat16 over many small random matrices (BENCHMARKS.md §A-3).

    PYTHONPATH=src python benchmarks/fast_stability.py [--cases 1500] [--methods fast fast5]

Each case: an m x n matrix (m, n uniform in 1..64), a spectrum that is either linear on [0.3, 1] x s_max
or a power law s_k = k^-a (a uniform in [0.3, 2]), scaled by f in [1, 2], and p in {0, 1/8, 1/4, 1/2};
the backend runs with bfloat16 work and is compared with float64 exact U S^p V^T. Power-law matrices
with few singular values have x_max = s_max / ||G||_S8 ~ 1, where a step set that amplifies rounding
along its trajectories blows up (the first fast5 set gave 2-193x the exact map there). Prints the
machine, the worst cases and the share of cases above 0.2, 0.5 and 1 relative error; deterministic
for a given --seed (the rounding of a bfloat16 product may differ between CPUs).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from htmuon import spectral_power  # noqa: E402
from machine import describe, header  # noqa: E402


def with_spectrum(s: torch.Tensor, m: int, n: int, g: torch.Generator) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(m, s.numel(), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=torch.float64))
    return (U * s) @ V.T


def relative_error(O: torch.Tensor, G: torch.Tensor, p: float) -> float:
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    ref = (U * s.pow(p)) @ Vh
    return float((O.double() - ref).norm() / ref.norm())


def run(method: str, kind: str, cases: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(cases):
        m, n = rng.randint(1, 64), rng.randint(1, 64)
        k = min(m, n)
        p = rng.choice([0.0, 0.125, 0.25, 0.5])
        f = rng.uniform(1.0, 2.0)
        if kind == "linear":
            s = torch.linspace(1.0, 0.3, k, dtype=torch.float64)
        else:
            s = torch.arange(1, k + 1, dtype=torch.float64) ** -rng.uniform(0.3, 2.0)
        G = (with_spectrum(s, m, n, g) * f).float()
        O = spectral_power(G, p, method=method, ns_dtype=torch.bfloat16)
        rows.append((relative_error(O, G, p), m, n, p, i))
    return sorted(rows, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1500, help="random matrices per method and spectrum")
    parser.add_argument("--methods", nargs="+", default=["fast", "fast5"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(header(describe()))
    print("| method | spectrum | cases | worst rel. error (m x n, p) | > 0.2 | > 0.5 | > 1 |")
    print("|---|---|---:|---|---:|---:|---:|")
    for method in args.methods:
        for kind in ("linear", "power-law"):
            rows = run(method, kind, args.cases, args.seed)
            worst = ", ".join(f"{e:.3g} ({m}x{n}, {p:g})" for e, m, n, p, _ in rows[:3])
            share = [sum(r[0] > t for r in rows) / len(rows) for t in (0.2, 0.5, 1.0)]
            print(
                f"| {method} | {kind} | {len(rows)} | {worst} | "
                + " | ".join(f"{100 * x:.2f}%" for x in share)
                + " |"
            )


if __name__ == "__main__":
    main()
