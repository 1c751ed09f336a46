"""Accuracy of the spectral backends against float64 exact U S^p V^T, and agreement with torch.optim.Muon.

    python benchmarks/accuracy.py [--p 0.125] [--seed 0]

Prints one row per (shape, spectrum, backend): the relative Frobenius error of spectral_power(G, p)
against float64 SVD, plus the max |difference| of one step of HTMuon(p=0, method="ns") against
torch.optim.Muon. Matrices are built as U diag(s) V^T with Haar-random factors and either a Gaussian
matrix's own spectrum or a power-law spectrum s_k = k^-1 (s spans [1/k, 1]). The Newton--Schulz
backends (fast, fast5, ns) get a column per working dtype, float32 and bfloat16: their error depends
on it, and ``ns_dtype="auto"`` picks one by the machine (the header names the machine and that pick).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from htmuon import BACKENDS, HTMuon, spectral_power  # noqa: E402
from htmuon.spectral import ns_working_dtype  # noqa: E402
from machine import describe, header, require_torch_muon  # noqa: E402

#: The backends whose error depends on the working dtype: one column per dtype.
NS_DTYPES = {"fast": ("float32", "bfloat16"), "fast5": ("float32", "bfloat16"), "ns": ("float32", "bfloat16")}

SHAPES = [(512, 512), (512, 1376), (1376, 512), (768, 2048)]


def exact(G: torch.Tensor, p: float) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U * s.pow(p)) @ Vh


def power_law(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64).pow(-1.0)
    return (U * s) @ V.T


def main() -> None:
    require_torch_muon()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.125)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    columns = []  # (label, method, options)
    for m in sorted(BACKENDS):
        if m == "auto":
            continue
        for dt in NS_DTYPES.get(m, (None,)):
            options = {"ns_dtype": getattr(torch, dt)} if dt else {}
            short = {"float32": "fp32", "bfloat16": "bf16"}.get(dt)
            columns.append((f"{m} {short}" if short else m, m, options))
    print(header(describe()))
    auto = ns_working_dtype("auto", torch.device("cpu"))
    print(f"relative error vs float64 exact U S^p V^T, p = {args.p}, float32 input; ns_dtype='auto' = {auto}")
    print("| shape | spectrum | " + " | ".join(label for label, _, _ in columns) + " | svd fp64 |")
    print("|---|---|" + "---|" * (len(columns) + 1))
    for m, n in SHAPES:
        for label, G in (
            ("gaussian", torch.randn(m, n, generator=g, dtype=torch.float64)),
            ("k^-1", power_law(m, n, g)),
        ):
            ref = exact(G, args.p)
            errs = []
            for _, method, options in columns:
                O = spectral_power(G.float(), args.p, method=method, **options).double()
                errs.append(((O - ref).norm() / ref.norm()).item())
            O64 = spectral_power(G, args.p, compute_dtype=torch.float64)
            errs.append(((O64 - ref).norm() / ref.norm()).item())
            print(f"| {m}x{n} | {label} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")

    print("\none step of HTMuon(p=0, method='ns') vs torch.optim.Muon (lr 0.02, wd 0.1, 512x1376):")
    W0, G = torch.randn(512, 1376, generator=g), torch.randn(512, 1376, generator=g)
    results = {}
    for label, factory in (
        ("torch.optim.Muon", lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1)),
        (
            "HTMuon ns_dtype=bf16",
            lambda ps: HTMuon(ps, lr=0.02, p=0.0, method="ns", weight_decay=0.1, ns_dtype=torch.bfloat16),
        ),
        (
            f"HTMuon ns_dtype=auto ({auto})",
            lambda ps: HTMuon(ps, lr=0.02, p=0.0, method="ns", weight_decay=0.1),
        ),
    ):
        W = torch.nn.Parameter(W0.clone())
        W.grad = G.clone()
        factory([W]).step()
        results[label] = W.detach()
    ref = results["torch.optim.Muon"]
    step = (ref - W0).abs().max().item()
    for label, W in results.items():
        print(
            f"  {label:<36} max |dW - dW_torch| = {(W - ref).abs().max().item():.2e}  (max |dW| = {step:.2e})"
        )


if __name__ == "__main__":
    main()
