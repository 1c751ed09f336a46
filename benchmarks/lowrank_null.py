"""How much each map lifts an exactly low-rank matrix's null space (docs/backends.md, "Precision").

For G = A @ B (A m x r, B r x n standard normal, seeds 0..S-1) prints, per map and work dtype, the
worst null singular value of the result over its largest, and the mean share of its squared norm
outside G's row and column spaces: the ``fast`` map at p = 0, 1/32, 1/16, 1/8 in bfloat16 and
float32, and torch.optim.Muon's bfloat16 Newton--Schulz. Properties of the maps, not timings.

    python benchmarks/lowrank_null.py [--m 64 --n 128 --rank 4 --seeds 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    from torch.optim._muon import _zeropower_via_newtonschulz
except ImportError:  # torch < 2.9: main() says so
    _zeropower_via_newtonschulz = None

from htmuon.spectral import MUON_NS5_COEFFICIENTS, spectral_power

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import require_torch_muon  # noqa: E402


def null_stats(O: torch.Tensor, rank: int) -> tuple[float, float]:
    s = torch.linalg.svdvals(O.double())
    return (s[rank:].max() / s[0]).item(), (s[rank:].square().sum() / s.square().sum()).item()


def main() -> None:
    require_torch_muon()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {}
    for seed in range(a.seeds):
        g = torch.Generator().manual_seed(seed)
        G = torch.randn(a.m, a.rank, generator=g) @ torch.randn(a.rank, a.n, generator=g)
        for p in (1 / 8, 1 / 16, 1 / 32, 0.0):
            for dt in (torch.bfloat16, torch.float32):
                O = spectral_power(G, p, method="fast", ns_dtype=dt)
                rows.setdefault(f"fast, p = {p:g}, {str(dt)[6:]}", []).append(null_stats(O, a.rank))
        O = _zeropower_via_newtonschulz(G, MUON_NS5_COEFFICIENTS, 5, 1e-7)
        rows.setdefault("torch.optim.Muon NS5, bfloat16", []).append(null_stats(O, a.rank))
    print(f"rank-{a.rank} {a.m} x {a.n}, seeds 0-{a.seeds - 1}")
    print("| map, work dtype | null s / s_max (worst) | share off the range (mean) |\n|---|---|---|")
    for name, vals in rows.items():
        print(f"| {name} | {max(v[0] for v in vals):.2g} | {sum(v[1] for v in vals) / len(vals):.2g} |")


if __name__ == "__main__":
    main()
