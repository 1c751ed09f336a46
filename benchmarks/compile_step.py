"""Eager vs ``torch.compile(opt.step)`` step time of HTMuon on LLaMA matrix shapes (CPU, inductor).

    PYTHONPATH=src python benchmarks/compile_step.py                    # 60m shapes, 2 blocks
    PYTHONPATH=src python benchmarks/compile_step.py --model 135m --blocks 1 --steps 10

Builds ``--blocks`` transformer blocks of the model's hidden matrices (q, k, v, o: h x h; gate, up:
i x h; down: h x i) plus a norm gain per block (the AdamW part), gives them fixed random gradients,
and times ``opt.step()`` eagerly and compiled (inductor, ``fullgraph=True``), interleaved, after a
warm-up that covers the compilation (reported separately). Prints the median step times, their
ratio, the compile time, the number of graphs compiled and the largest difference between the
compiled and the eager parameters. One thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from htmuon import HTMuon

MODELS = {"60m": (512, 1376), "135m": (768, 2048)}


def build(h: int, i: int, blocks: int, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)] + [(h,)]
    params = []
    for _ in range(blocks):
        for s in shapes:
            p = nn.Parameter(torch.randn(s, generator=g) * 0.02)
            p.grad = torch.randn(s, generator=g) * 1e-3
            params.append(p)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="60m")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default="muon,ns", help="muon (p=0, ns), ns (p=0.125, ns)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, i = MODELS[args.model]
    configs = {"muon": dict(p=0.0, method="ns"), "ns": dict(p=0.125, method="ns")}
    print(
        f"CPU: {platform.processor() or platform.machine()}; torch {torch.__version__}; "
        f"capability {torch.backends.cpu.get_cpu_capability()}; threads {torch.get_num_threads()}"
    )
    print(f"{args.model} shapes, {args.blocks} block(s), {args.steps} timed steps each")
    for name in args.configs.split(","):
        kw = configs[name]
        eager_params, comp_params = build(h, i, args.blocks), build(h, i, args.blocks)
        eager = HTMuon(eager_params, lr=0.02, **kw)
        opt = HTMuon(comp_params, lr=0.02, **kw)
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        step = torch.compile(opt.step, fullgraph=True)
        t0 = time.perf_counter()
        step()
        step()  # the first step creates the state: one recompile
        compile_s = time.perf_counter() - t0
        eager.step()
        eager.step()
        te, tc = [], []
        for _ in range(args.steps):
            t = time.perf_counter()
            eager.step()
            te.append(time.perf_counter() - t)
            t = time.perf_counter()
            step()
            tc.append(time.perf_counter() - t)
        diff = max((a - b).abs().max().item() for a, b in zip(comp_params, eager_params))
        me, mc = statistics.median(te), statistics.median(tc)
        print(
            f"{name:5s} eager {me * 1e3:8.1f} ms  compiled {mc * 1e3:8.1f} ms  ratio {mc / me:5.2f}  "
            f"compile {compile_s:6.1f} s  graphs {counters['stats']['unique_graphs']}  max |diff| {diff:.2e}"
        )


if __name__ == "__main__":
    main()
