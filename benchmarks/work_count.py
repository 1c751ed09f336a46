"""Matmul FLOPs and bytes touched by one optimizer step, per row of step_cost.py (a GPU estimate, issue 11).

    PYTHONPATH=src python benchmarks/work_count.py                  # 60M and 135M matrix sets
    PYTHONPATH=src python benchmarks/work_count.py --paper-code /tmp/paper_htmuon/muon.py

No GPU is needed: the step runs on CPU under a ``TorchDispatchMode`` that sees every aten op the
step dispatches -- the same ops a CUDA step dispatches for the same dtypes (``ns_dtype="auto"``
resolves per device, so the ``auto`` rows count what this machine runs; the explicit-dtype rows are
device-independent). For each op it adds

* matmul FLOPs (``mm``, ``bmm``, ``addmm``, ``baddbmm``: ``2 m k n`` per matrix), split by dtype;
* the bytes of its tensor inputs and outputs (views excluded): what an unfused kernel-per-op GPU
  step reads and writes in memory, an upper bound of DRAM traffic (caches and fusion can only
  lower it);
* the factorizations (``linalg_eigh`` of a ``k x k`` batch, ``linalg_svd`` of ``k x n``, ``k <= n``) as
  analytic FLOPs: eigh ~9 k^3, thin SVD ~4 k^2 n + 22 k^3 (Golub & Van Loan's operation counts);
  on a GPU these run in cuSOLVER, far below matmul peak, so they are listed apart.

Counting runs one transformer block (``--layers 1``) and multiplies by the depth: every block has
the same shapes, and the step's work is linear in the number of same-shape matrices. The printed
lower bound for one step on a GPU is ``max(sum FLOPs / peak for each dtype, bytes / bandwidth)``,
with the ``--peak-*`` figures (default: NVIDIA H200 SXM datasheet, dense: bf16 989 TFLOP/s, fp32
67, fp64 67, HBM 4.8 TB/s; fp32 matmuls at the non-TF32 rate, torch's default precision).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, header, write_json  # noqa: E402
from step_cost import LR, MODELS, MOMENTUM, WEIGHT_DECAY, all_rows, load_paper_module, matrix_set  # noqa: E402

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default}
EIGH = {aten._linalg_eigh.default, aten.linalg_eigh.default}
SVD = {aten._linalg_svd.default, aten.linalg_svd.default}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def matmul_flops(a_shape: torch.Size, b_shape: torch.Size) -> int:
    """``2 m k n`` per matrix of ``(..., m, k) @ (..., k, n)``, times the batch."""
    *batch, m, k = a_shape
    n = b_shape[-1]
    count = 1
    for d in batch:
        count *= d
    return 2 * count * m * k * n


def factorization_flops(name: str, shape: torch.Size) -> int:
    """Analytic FLOPs of eigh (``k x k``: 9 k^3) or thin SVD (``k x n``, k <= n: 4 k^2 n + 22 k^3)."""
    *batch, r, c = shape
    k, n = min(r, c), max(r, c)
    count = 1
    for d in batch:
        count *= d
    per = 9 * k**3 if name == "eigh" else 4 * k * k * n + 22 * k**3
    return count * per


class WorkCounter(TorchDispatchMode):
    """Counts matmul FLOPs by dtype, bytes of op inputs/outputs, and factorization FLOPs."""

    def __init__(self):
        super().__init__()
        self.flops: dict[str, int] = defaultdict(int)
        self.factor_flops: dict[str, int] = defaultdict(int)
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        self.ops += 1
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        if func in MATMULS:
            a, b = (args[0], args[1]) if func in (aten.mm.default, aten.bmm.default) else (args[1], args[2])
            self.flops[DTYPE_NAMES.get(a.dtype, str(a.dtype))] += matmul_flops(a.shape, b.shape)
        elif func in EIGH:
            self.factor_flops["eigh"] += factorization_flops("eigh", args[0].shape)
        elif func in SVD:
            self.factor_flops["svd"] += factorization_flops("svd", args[0].shape)
        return out


def count_row(row, shapes, seed: int) -> WorkCounter:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for prm in params:
        prm.grad = torch.randn(prm.shape, generator=g)
    opt = row.make(params, LR, MOMENTUM, WEIGHT_DECAY)
    opt.step()  # state allocation is not part of a step's work
    counter = WorkCounter()
    with counter:
        for _ in range(row.steps):
            opt.step()
    for d in (counter.flops, counter.factor_flops):
        for k in d:
            d[k] //= row.steps
    counter.bytes //= row.steps
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rows", nargs="+", default=None, help="row keys (default all; muon always)")
    parser.add_argument("--paper-code", default=None, help="path of the paper's muon.py (outside this repo)")
    parser.add_argument("--peak-bf16", type=float, default=989e12, help="FLOP/s (default H200 dense)")
    parser.add_argument("--peak-fp32", type=float, default=67e12)
    parser.add_argument("--peak-fp64", type=float, default=67e12)
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s (default H200 HBM3e)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="results/work_count.json")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = all_rows(load_paper_module(args.paper_code) if args.paper_code else None)
    if args.rows is not None:
        known = {r.key for r in rows}
        if set(args.rows) - known:  # a typo counted Muon's row alone, silently
            parser.error(f"unknown --rows {sorted(set(args.rows) - known)}; valid: {sorted(known)}")
        rows = [r for r in rows if r.key == "muon" or r.key in args.rows]
    peaks = {"bf16": args.peak_bf16, "fp16": args.peak_bf16, "fp32": args.peak_fp32, "fp64": args.peak_fp64}
    info = describe("cpu")
    print(header(info))
    print(
        f"# counted on one block x depth; GPU bound: max(matmul FLOPs / peak, bytes / "
        f"{args.bandwidth / 1e12:.1f} TB/s), peaks bf16 {args.peak_bf16 / 1e12:.0f}, "
        f"fp32 {args.peak_fp32 / 1e12:.0f}, fp64 {args.peak_fp64 / 1e12:.0f} TFLOP/s; factorizations apart"
    )
    results = []
    for model in args.models:
        depth = MODELS[model][2]
        shapes = matrix_set(model, layers=1)
        n_params = depth * sum(a * b for a, b in shapes)
        print(f"\n## {model}: {depth} blocks, {n_params / 1e6:.1f}M matrix parameters\n")
        print(
            "| row | matmul GFLOP (dtype) | factorization GFLOP | GB touched | B / param "
            "| GPU bound: matmul ms | GPU bound: memory ms |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        for row in rows:
            c = count_row(row, shapes, args.seed)
            flops = {k: v * depth for k, v in c.flops.items()}
            factor = {k: v * depth for k, v in c.factor_flops.items()}
            nbytes = c.bytes * depth
            t_mm = sum(v / peaks.get(k, args.peak_fp32) for k, v in flops.items())
            t_mem = nbytes / args.bandwidth
            fl = ", ".join(f"{v / 1e9:.0f} {k}" for k, v in sorted(flops.items())) or "0"
            fa = ", ".join(f"{v / 1e9:.0f} {k}" for k, v in sorted(factor.items())) or "-"
            print(
                f"| {row.label} | {fl} | {fa} | {nbytes / 1e9:.2f} | {nbytes / n_params:.0f} | "
                f"{1e3 * t_mm:.2f} | {1e3 * t_mem:.2f} |",
                flush=True,
            )
            results.append(
                dict(
                    model=model,
                    key=row.key,
                    label=row.label,
                    matmul_flops=flops,
                    factorization_flops=factor,
                    bytes=nbytes,
                    bytes_per_param=nbytes / n_params,
                    gpu_matmul_s=t_mm,
                    gpu_memory_s=t_mem,
                )
            )
    if args.json:
        write_json(args.json, dict(machine=info, args=vars(args), results=results))
        print(f"\n# numbers in {args.json}")


if __name__ == "__main__":
    main()
