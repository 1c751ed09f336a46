"""Step cost and accuracy of HTMuon's spectral backends on the LLaMA-60M / LLaMA-135M matrix shapes.

    PYTHONPATH=src python benchmarks/step_cost.py                       # fp32 and bf16, both models
    PYTHONPATH=src python benchmarks/step_cost.py --models 60m --dtypes fp32 --repeats 2

For each model size and working dtype it builds the hidden matrices of ``--blocks`` transformer
blocks (q, k, v, o: h x h; gate, up: i x h; down: h x i -- the "standard" routing; ``--routing
paper`` adds the 32000 x h embedding and LM head), gives them random gradients, and times
``HTMuon.step()`` for every backend, interleaved round-robin in one process (``--repeats`` rounds;
the median is kept), so that the ratios to Muon's NS5 step come from the same run on the same,
possibly shared, machine. Times are per optimizer step, extrapolated to the full depth
(``layers / blocks`` x the measured blocks, plus the embedding and head once): every block has
the same shapes and the backends batch same-shape matrices, so the cost is linear in depth.

Errors are the relative Frobenius error of the spectral map (the direction before the learning
rate) against float64 exact ``U S^p V^T`` (Muon: against the exact polar factor ``U V^T``), the
largest over the measured matrices, for two gradient families: power-law spectra ``s_k = k^-a``
with ``a`` chosen so that s spans [1e-3, 1] of s_max, and Gaussian matrices.

Rows:
  muon NS5        HTMuon(p=0, method="ns"): Muon's Newton--Schulz polar factor (the reference cost)
  fast / fast5    the matmul-only backends of htmuon.fast (6 / 5 quintic steps)
  eigh            float64 eigh of the small Gram matrix (CPU's exact path)
  svd             float32 thin SVD (the paper's exact path)
  paper NS        the paper's HTMuon-NS path, as published: NS5 polar x (G^T G)^(1/16) from four
                  nested coupled Newton--Schulz square roots (5 iterations each) on the LARGE Gram
                  side (defined here; the library's "ns" backend works on the small side)
  ... interval 5  amortised cost of the correction on every 5th step, Muon's NS5 otherwise:
                  (t_backend + 4 t_muon) / 5 from the same run's measurements

Threads: 1 by default. On a small shared machine, two OpenMP threads make every parallel
elementwise op wait for a scheduling slice (measured here: ~8 ms for any 1M-element add, 0.17 ms
on one thread), which swamps the ratios; one thread measures the arithmetic. ``--threads 0``
keeps torch's default.

Slow combinations are skipped on CPU (bfloat16 matmul is 30-180x slower than float32 there): svd
and eigh run in float32/float64 whatever the dtype, and the paper NS path is run in float32 only.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from htmuon import HTMuon, polar, register_backend, spectral_power
from htmuon.spectral import BACKENDS, _coupled_ns_sqrt

MODELS = {
    # hidden, intermediate, layers (PAPER.md); vocabulary 32000
    "60m": (512, 1376, 8),
    "135m": (768, 2048, 12),
}
VOCAB = 32000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PAPER_NS_ROOTS = 4  # (G^T G)^(1/16): p = 1/8 only
PAPER_NS_ROOT_ITERS = 5


# ------------------------------------------------------------------ the paper's NS path (baseline)


def paper_ns_direction(X: torch.Tensor, p: float, spectrum: str, *, ns_dtype=torch.float32) -> torch.Tensor:
    """The paper's HTMuon-NS map for p = 1/8: ``polar(G) @ (G^T G)^(1/16)`` with the Gram matrix on
    the large side (n x n for a wide m x n batch) and four nested coupled-NS square roots."""
    if abs(p - 0.125) > 1e-12:
        raise ValueError(f"the paper's NS path computes p = 1/8 only, got p = {p}")
    P = polar(X, dtype=ns_dtype)
    Xc = X.to(ns_dtype)
    root = Xc.mT @ Xc  # n x n: the large side, as in the paper's implementation
    for _ in range(PAPER_NS_ROOTS):
        root = _coupled_ns_sqrt(root, PAPER_NS_ROOT_ITERS)
    return (P @ root).float()


if "paper_ns" not in BACKENDS:
    register_backend("paper_ns", paper_ns_direction, description="benchmark baseline: the paper's NS path")


# ------------------------------------------------------------------ matrices


def model_shapes(
    model: str, blocks: int, routing: str
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(block matrices for ``blocks`` blocks, once-per-model matrices) as (out, in) shapes."""
    h, i, _ = MODELS[model]
    per_block = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]
    once = [(VOCAB, h), (VOCAB, h)] if routing == "paper" else []
    return per_block * blocks, once


def gradient(shape: tuple[int, int], kind: str, g: torch.Generator) -> torch.Tensor:
    m, n = shape
    if kind == "gaussian":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    k = min(m, n)
    a = 3.0 / math.log10(k)  # s_k = k^-a spans [1e-3, 1]
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64).pow(-a)
    return (U * s) @ V.T


def exact(G: torch.Tensor, p: float) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    return (U * s.pow(p)) @ Vh


# ------------------------------------------------------------------ configurations


def configs(dtype_name: str, p: float, skip: set[str]) -> list[tuple[str, dict]]:
    dt = DTYPES[dtype_name]
    rows = [
        ("muon NS5", dict(p=0.0, method="ns", ns_dtype=dt)),
        ("fast", dict(p=p, method="fast", ns_dtype=dt)),
        ("fast5", dict(p=p, method="fast5", ns_dtype=dt)),
        ("eigh", dict(p=p, method="eigh")),
        ("svd", dict(p=p, method="svd")),
        ("paper NS", dict(p=p, method="paper_ns", _paper=True)),
    ]
    out = []
    for label, kw in rows:
        if label in skip:
            continue
        if kw.pop("_paper", False):
            if dtype_name != "fp32" or abs(p - 0.125) > 1e-12:
                continue  # bf16 matmul on CPU: 30-180x; the paper path only exists for p = 1/8
        if dtype_name != "fp32" and label in ("eigh", "svd"):
            continue  # they do not use the working dtype: same numbers as the fp32 table
        out.append((label, kw))
    return out


def direction(G: torch.Tensor, kw: dict) -> torch.Tensor:
    """The spectral map a config applies (no momentum, no lr)."""
    kw = dict(kw)
    p, method = kw.pop("p"), kw.pop("method")
    if method == "ns" and p == 0.0:
        return polar(G, dtype=kw["ns_dtype"]).float()
    if method == "paper_ns":
        return spectral_power(G, p, method=method)
    return spectral_power(G, p, method=method, **kw)


# ------------------------------------------------------------------ the run


def run(model: str, dtype_name: str, args) -> list[dict]:
    _, _, layers = MODELS[model]
    g = torch.Generator().manual_seed(args.seed)
    block, once = model_shapes(model, args.blocks, args.routing)
    shapes = block + once
    grads = {kind: [gradient(s, kind, g) for s in shapes] for kind in ("power", "gaussian")}
    reference = {kind: [] for kind in grads}
    cfgs = configs(dtype_name, args.p, set(args.skip))

    # Timing: one optimizer per config over the same parameters' shapes; round-robin repeats.
    timed: dict[str, list[float]] = {label: [] for label, _ in cfgs}
    opts = {}
    for label, kw in cfgs:
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for prm, G in zip(params, grads["power"]):
            prm.grad = G.float()
        opts[label] = (HTMuon(params, lr=1e-3, check_finite=False, **kw), len(block))
    for opt, _ in opts.values():  # warm-up (allocations, lazy state)
        opt.step()
    for _ in range(args.repeats):
        for label, (opt, _) in opts.items():
            t0 = time.perf_counter()
            opt.step()
            timed[label].append(time.perf_counter() - t0)
    # per-block vs once-per-model split, to extrapolate to full depth: time the "once" matrices alone
    once_time: dict[str, float] = {}
    if once:
        for label, kw in cfgs:
            params = [torch.nn.Parameter(torch.zeros(s)) for s in once]
            for prm, G in zip(params, grads["power"][len(block) :]):
                prm.grad = G.float()
            opt = HTMuon(params, lr=1e-3, check_finite=False, **kw)
            opt.step()
            t0 = time.perf_counter()
            opt.step()
            once_time[label] = time.perf_counter() - t0

    # Errors vs float64 exact.
    errors: dict[str, dict[str, float]] = {label: {} for label, _ in cfgs}
    for kind, Gs in grads.items():
        refs_p = [exact(G, args.p) for G in Gs]
        refs_0 = [exact(G, 0.0) for G in Gs]
        reference[kind] = refs_p
        for label, kw in cfgs:
            refs = refs_0 if kw["p"] == 0.0 else refs_p
            worst = 0.0
            for G, R in zip(Gs, refs):
                O = direction(G.float(), kw).double()
                worst = max(worst, ((O - R).norm() / R.norm()).item())
            errors[label][kind] = worst

    rows = []
    for label, _ in cfgs:
        t = statistics.median(timed[label])
        t_once = once_time.get(label, 0.0)
        full = (t - t_once) * layers / args.blocks + t_once
        rows.append(dict(model=model, dtype=dtype_name, backend=label, ms=1e3 * full, errors=errors[label]))
    muon = next(r for r in rows if r["backend"] == "muon NS5")["ms"]
    for r in rows:
        r["ratio"] = r["ms"] / muon
    for label in ("fast", "svd", "paper NS", "eigh"):
        r = next((r for r in rows if r["backend"] == label), None)
        if r is not None and args.interval > 1:
            k = args.interval
            ms = (r["ms"] + (k - 1) * muon) / k
            rows.append(
                dict(
                    model=model,
                    dtype=dtype_name,
                    backend=f"{label}, interval {k}",
                    ms=ms,
                    ratio=ms / muon,
                    errors={kind: float("nan") for kind in grads},
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--p", type=float, default=0.125)
    parser.add_argument("--blocks", type=int, default=1, help="transformer blocks measured (default 1)")
    parser.add_argument("--routing", default="standard", choices=("standard", "paper"))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median kept; default 3)")
    parser.add_argument("--interval", type=int, default=5, help="interval k for the amortised rows")
    parser.add_argument("--skip", nargs="*", default=[], help="backend labels to leave out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: see the module docstring; 0 = torch's)",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.blocks < 1 or args.repeats < 1:
        parser.error("--blocks and --repeats must be >= 1")

    print(
        f"# torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} threads, p = {args.p}, {args.blocks} block(s) measured, "
        f"routing {args.routing}, median of {args.repeats}"
    )
    print("| model | dtype | backend | ms / step | x Muon NS5 | err power-law | err Gaussian |")
    print("|---|---|---|---:|---:|---:|---:|")
    for model in args.models:
        for dtype_name in args.dtypes:
            for r in run(model, dtype_name, args):
                e = r["errors"]
                errs = " | ".join(
                    "-" if math.isnan(e[k]) else f"{100 * e[k]:.2f}%" for k in ("power", "gaussian")
                )
                head = f"| {r['model']} | {r['dtype']} | {r['backend']} | {r['ms']:.0f} | {r['ratio']:.2f}"
                print(f"{head} | {errs} |", flush=True)


if __name__ == "__main__":
    main()
