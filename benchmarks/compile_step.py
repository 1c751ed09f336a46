"""Eager vs ``torch.compile(opt.step)`` step time of HTMuon on LLaMA matrix shapes (CPU, inductor).

    PYTHONPATH=src python benchmarks/compile_step.py                    # 60m shapes, 2 blocks
    PYTHONPATH=src python benchmarks/compile_step.py --model 135m --blocks 1 --steps 10

Builds ``--blocks`` transformer blocks of the model's hidden matrices (q, k, v, o: h x h; gate, up:
i x h; down: h x i) plus a norm gain per block (the AdamW part), gives them fixed random gradients,
and times ``opt.step()`` eagerly and compiled (inductor, ``fullgraph=True``), interleaved with
``torch.optim.Muon``'s eager step on the same shapes (the reference: every time is also given as a
ratio to it; the order of the three rotates each round; lr 0.02 and weight decay 0.1 on both sides:
torch.optim.Muon decays its parameters even at ``weight_decay=0``, where HTMuon skips the pass), after
a warm-up that covers the compilation (reported separately). Wall time (``time.perf_counter``).
Prints the median step times, their ratios, the compile time, the number of graphs compiled and the largest
difference between the compiled and the eager parameters; ``--json`` writes them with the machine
(CPU model, matmul ISA). One thread by default (``--threads``). ``--profile N`` also profiles N more
steps of each (torch.profiler, after the timing) and splits a step's operator time into the matrix
products (``mm``, ``addmm``, ``bmm``, ``baddbmm`` and their in-place forms) and everything else (the
elementwise passes; compiled, inductor's generated kernels count there): where compiling could save.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from htmuon import HTMuon  # noqa: E402
from machine import describe, header, require_torch_muon, time_rounds, write_json  # noqa: E402

MODELS = {"60m": (512, 1376), "135m": (768, 2048)}
LR, WEIGHT_DECAY = 0.02, 0.1  # both sides (step_cost.py's)

#: The operators that are matrix products (their own time: ``matmul`` only dispatches to them).
MATMUL_OPS = frozenset(
    f"aten::{op}{suffix}" for op in ("mm", "addmm", "bmm", "baddbmm", "matmul") for suffix in ("", "_")
)


def split_matmul(self_times: list[tuple[str, float]], steps: int) -> tuple[float, float]:
    """``(matmul_ms, other_ms)`` per step from profiler events' ``(name, self time in us)`` over
    ``steps`` steps: the self times of :data:`MATMUL_OPS` against all the rest (each event's own time
    counted once, so the two add up to the profiled time)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mm = sum(t for name, t in self_times if name in MATMUL_OPS)
    rest = sum(t for name, t in self_times if name not in MATMUL_OPS)
    return mm / 1e3 / steps, rest / 1e3 / steps


def profile_split(fn, steps: int) -> tuple[float, float]:
    """Profile ``steps`` calls of ``fn`` on the CPU and :func:`split_matmul` them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return split_matmul([(e.key, e.self_cpu_time_total) for e in prof.key_averages()], steps)


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


def optimizers(kw: dict, h: int, i: int, blocks: int):
    """``(reference, eager, to_compile, eager_params, compiled_params)``: torch.optim.Muon on the
    hidden matrices of ``blocks`` blocks, and two HTMuon(``kw``) on the same blocks with their norm
    gains, at the same lr and weight decay."""
    eager_params, comp_params = build(h, i, blocks), build(h, i, blocks)
    ref_params = [p for p in build(h, i, blocks) if p.ndim == 2]
    ref = torch.optim.Muon(ref_params, lr=LR, weight_decay=WEIGHT_DECAY, adjust_lr_fn="match_rms_adamw")
    eager = HTMuon(eager_params, lr=LR, weight_decay=WEIGHT_DECAY, **kw)
    opt = HTMuon(comp_params, lr=LR, weight_decay=WEIGHT_DECAY, **kw)
    return ref, eager, opt, eager_params, comp_params


def main() -> None:
    require_torch_muon()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="60m")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--configs",
        default="default,fast5,muon",
        help="default (p=0.125, auto), fast5 (p=0.125), muon (p=0, ns), ns (p=0.125, ns)",
    )
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile N more steps of each: matmul vs the rest"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, i = MODELS[args.model]
    configs = {
        "default": dict(p=0.125),
        "fast5": dict(p=0.125, method="fast5"),
        "muon": dict(p=0.0, method="ns"),
        "ns": dict(p=0.125, method="ns"),
    }
    info = describe()
    print(header(info))
    print(f"{args.model} shapes, {args.blocks} block(s), {args.steps} timed steps each")
    rows = []
    for name in args.configs.split(","):
        kw = configs[name]
        ref, eager, opt, eager_params, comp_params = optimizers(kw, h, i, args.blocks)
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
        ref.step()
        times = time_rounds({"muon": ref.step, "eager": eager.step, "compiled": step}, args.steps)
        tr, te, tc = times["muon"], times["eager"], times["compiled"]
        diff = max((a - b).abs().max().item() for a, b in zip(comp_params, eager_params))
        me, mc, mr = statistics.median(te), statistics.median(tc), statistics.median(tr)
        # per-round ratios to the reference, then their median (robust to a noisy host)
        re_ = statistics.median(e / r for e, r in zip(te, tr))
        rc = statistics.median(c / r for c, r in zip(tc, tr))
        graphs = int(counters["stats"]["unique_graphs"])
        print(
            f"{name:7s} torch.optim.Muon {mr * 1e3:7.1f} ms  eager {me * 1e3:7.1f} ms (x{re_:4.2f})  "
            f"compiled {mc * 1e3:7.1f} ms (x{rc:4.2f})  compiled/eager {mc / me:4.2f}  "
            f"compile {compile_s:6.1f} s  graphs {graphs}  max |diff| {diff:.2e}"
        )
        split = {}
        if args.profile:
            for label, fn in (("eager", eager.step), ("compiled", step)):
                mm, rest = profile_split(fn, args.profile)
                split[f"{label}_matmul_ms"], split[f"{label}_other_ms"] = mm, rest
            print(
                f"{'':7s} profiled ({args.profile} steps), ms per step: "
                f"eager matmul {split['eager_matmul_ms']:6.1f} other {split['eager_other_ms']:5.1f} | "
                f"compiled matmul {split['compiled_matmul_ms']:6.1f} other {split['compiled_other_ms']:5.1f}"
            )
        rows.append(
            dict(
                config=name,
                options=dict(kw),
                muon_ms=mr * 1e3,
                eager_ms=me * 1e3,
                compiled_ms=mc * 1e3,
                eager_x_muon=re_,
                compiled_x_muon=rc,
                compile_s=compile_s,
                graphs=graphs,
                max_abs_diff=diff,
                eager_s=te,
                compiled_s=tc,
                muon_s=tr,
                **split,
            )
        )
    if args.json:
        write_json(args.json, dict(machine=info, args=vars(args), results=rows))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
