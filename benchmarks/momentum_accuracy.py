"""The spectral backends on REAL momentum matrices (from training checkpoints) against float64 exact.

    PYTHONPATH=src python benchmarks/momentum_accuracy.py RUN/ckpt.pt [RUN2/ckpt.pt ...] [--p 0.125]

``benchmarks/accuracy.py`` and ``fast_accuracy.py`` measure the backends on synthetic spectra; the
``fast`` backends are fitted on normalised singular values in [7e-4, 1] and damp smaller ones
towards 0 (as Muon does), so their error on a real update depends on how much of the momentum's
spectrum lies below that domain. This script reads the momentum buffers of the HTMuon group from
htmuon training checkpoints (``htmuon train`` / ``compare`` run folders), maps each with every
backend in the working dtypes the library uses, and prints per checkpoint the median and the worst
relative Frobenius error against float64 exact ``U S^p V^T``, with the share of singular values
below the fitted domain (relative to each matrix's Schatten-8 norm, as the fast backend sees them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from htmuon import spectral_power  # noqa: E402
from htmuon.fast import FAST_DOMAIN_LO  # noqa: E402
from htmuon.train import checkpoint  # noqa: E402
from machine import describe, header  # noqa: E402

#: (label, method, options): the backends as the default chooses them on each kind of device.
COLUMNS = (
    ("fast bf16", "fast", {"ns_dtype": torch.bfloat16}),
    ("fast fp32", "fast", {"ns_dtype": torch.float32}),
    ("fast5 bf16", "fast5", {"ns_dtype": torch.bfloat16}),
    ("eigh", "eigh", {}),
    ("svd fp32", "svd", {}),
)


def momenta(payload: dict) -> list[torch.Tensor]:
    """The momentum buffers of a checkpoint payload's HTMuon (matrix) group, as float64 matrices."""
    state = payload["optimizer"]
    out = []
    for group in state["param_groups"]:
        if group.get("algorithm") != "htmuon":
            continue
        for pid in group["params"]:
            buf = state["state"].get(pid, {}).get("momentum_buffer")
            if buf is not None and buf.ndim >= 2:
                out.append(buf.double().reshape(buf.shape[0], -1))
    return out


def exact(M: torch.Tensor, p: float) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U * s.pow(p)) @ Vh


def below_domain(M: torch.Tensor) -> float:
    """Share of singular values below FAST_DOMAIN_LO x the Schatten-8 norm."""
    s = torch.linalg.svdvals(M)
    s8 = s.pow(8).sum().pow(1 / 8)
    return (s < FAST_DOMAIN_LO * s8).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--p", type=float, default=0.125)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(header(describe()))
    print(f"relative error vs float64 exact U S^p V^T of each momentum matrix, p = {args.p}")
    print(
        "| checkpoint | step | matrices | below domain, median (max) | "
        + " | ".join(c[0] for c in COLUMNS)
        + " |"
    )
    print("|---|---:|---:|---:|" + "---:|" * len(COLUMNS))
    for path in args.checkpoints:
        payload = checkpoint.load(path)
        mats, step = momenta(payload), payload["step"]
        errors = {label: [] for label, _, _ in COLUMNS}
        shares = []
        for M in mats:
            ref = exact(M, args.p)
            shares.append(below_domain(M))
            for label, method, options in COLUMNS:
                O = spectral_power(M.float(), args.p, method=method, **options).double()
                errors[label].append(((O - ref).norm() / ref.norm()).item())
        cells = [f"{statistics.median(v):.3f} ({max(v):.3f})" for v in errors.values()]
        name = "/".join(path.parts[-4:-1])
        share = f"{statistics.median(shares):.1%} ({max(shares):.1%})"
        print(f"| {name} | {step} | {len(mats)} | {share} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
