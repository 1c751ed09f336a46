"""Accuracy of the "fast" backends against float64 exact U S^p V^T on constructed spectra, fp32 and bf16.

    PYTHONPATH=src python benchmarks/fast_accuracy.py [--shapes 512x1376 768x2048] [--p 0.125]
    PYTHONPATH=src python benchmarks/fast_accuracy.py --accelerator-paths   # the GPU's batched path, on CPU
    PYTHONPATH=src python benchmarks/fast_accuracy.py --pointwise   # the fitted scalar map's own errors

Four spectra per shape, each spanning three decades except the Gaussian one: log-uniform on
[1e-3, 1]; power law s_k = k^-a spanning [1e-3, 1]; a Gaussian matrix's; and "flat+tail" (half
the singular values at 1, the rest log-uniform down to 1e-3: the worst case for the Schatten-8
normalisation). Columns: "bf16 rounding alone" is the exact map of the bfloat16-rounded matrix
against the exact map of the matrix (what rounding the input costs before any algorithm runs);
then per backend: float32 (input and matmuls) against exact; "bf16": bfloat16 input (as from a
bfloat16 momentum buffer) and bfloat16 work (matmuls and the iterate, as in Muon; the output sum
stays float32) against the exact map of that same bfloat16 input
(the algorithm's own error); "bf16 total": the same output against the exact map of the unrounded
matrix. Last, p = 0 (the polar factor) for "fast" and for Muon's NS5, float32.
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch

from htmuon import polar, spectral_power
from htmuon.spectral import accelerator_paths


def with_spectrum(s: torch.Tensor, m: int, n: int, g: torch.Generator) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(m, s.numel(), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=torch.float64))
    return (U * s) @ V.T


def cases(m: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)  # singular values of an m x n matrix (a tall shape has n of them)
    k = torch.arange(1, r + 1, dtype=torch.float64)
    half = torch.ones(r // 2, dtype=torch.float64)
    return {
        "log-uniform": with_spectrum(torch.logspace(0, -3, r, dtype=torch.float64), m, n, g),
        "power-law": with_spectrum(k.pow(-3 / math.log10(r)), m, n, g),
        "gaussian": torch.randn(m, n, generator=g, dtype=torch.float64),
        "flat+tail": with_spectrum(
            torch.cat([half, torch.logspace(0, -3, r - r // 2, dtype=torch.float64)]), m, n, g
        ),
    }


def exact(G: torch.Tensor, p: float) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U * s.pow(p)) @ Vh


def err(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{100 * ((a.double() - b).norm() / b.norm()).item():.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["512x1376", "768x2048"])
    parser.add_argument("--p", type=float, default=0.125)
    parser.add_argument("--methods", nargs="+", default=["fast", "fast5"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--accelerator-paths",
        action="store_true",
        help="CPU: the batched code path a GPU takes (BENCHMARKS §A-8)",
    )
    parser.add_argument(
        "--pointwise",
        action="store_true",
        help="the scalar map's relative error |f(x) - x^p| / x^p at x = 1 and its worst on the domain",
    )
    args = parser.parse_args()
    if args.pointwise:
        pointwise(args.methods)
        return
    with accelerator_paths() if args.accelerator_paths else contextlib.nullcontext():
        run(args)


def pointwise(methods: list[str]) -> None:
    """What a matrix with few singular values sees: the fitted scalar map at single points (docs/backends.md,
    "Pointwise"), from the coefficients and output weights the backends use, in float64."""
    from htmuon.fast import FAST_COEFFICIENTS, fit_grid, output_weights, scalar_iterates

    x = fit_grid()
    print("relative error of the scalar map: at x = 1 | worst on the domain (at x)")
    for method in methods:
        coefficients = FAST_COEFFICIENTS[method]
        for p in (0.0, 0.03125, 0.0625, 0.125, 0.25, 0.5):
            f = scalar_iterates(coefficients, x) @ torch.tensor(output_weights(p, coefficients)).numpy()
            rel = abs(f - x**p) / x**p
            k = int(rel.argmax())
            print(f"{method:6s} p = {p:<7g} {rel[-1]:7.2%} | {rel[k]:7.2%} (x = {x[k]:.1e})")


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    cols = [f"{m} {c}" for m in args.methods for c in ("fp32", "bf16", "bf16 total")]
    print(f"relative error vs float64 exact, p = {args.p} (p = 0 columns: vs the exact polar factor)")
    print("| shape | spectrum | bf16 rounding alone | " + " | ".join(cols) + " | fast p=0 | Muon NS5 p=0 |")
    print("|---|---|---:|" + "---:|" * (len(cols) + 2))
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        for name, G in cases(m, n, args.seed).items():
            G16 = G.bfloat16()
            ref, ref0, ref16 = exact(G, args.p), exact(G, 0.0), exact(G16, args.p)
            row = [err(ref16, ref)]
            for method in args.methods:
                row.append(err(spectral_power(G.float(), args.p, method=method, ns_dtype=torch.float32), ref))
                out16 = spectral_power(G16, args.p, method=method, ns_dtype=torch.bfloat16)
                row += [err(out16, ref16), err(out16, ref)]
            row.append(err(spectral_power(G.float(), 0.0, method="fast", ns_dtype=torch.float32), ref0))
            row.append(err(polar(G.float(), dtype=torch.float32), ref0))
            print(f"| {shape} | {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
