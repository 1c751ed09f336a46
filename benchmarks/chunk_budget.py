"""Step time and transient memory against ``chunk_bytes``, next to torch.optim.Muon (issue 11).

    PYTHONPATH=src python benchmarks/chunk_budget.py --device cuda --budgets 32 48 64 128 256 512

The budget trades memory for the number of chunks a step makes, and each chunk costs a fixed number
of operator launches (scaling, checks, stacking, the iterations). For each budget (MiB) and model
(LLaMA-60M / 135M matrix sets, fp32 parameters, Gaussian gradients, HTMuon's defaults otherwise) this
prints the chunks of the plan, the wall time per step as a ratio to torch.optim.Muon's steps timed
right before and after it (median over rounds), and the measured peak transient bytes (CUDA:
``max_memory_allocated``; CPU: the profiler's allocations), next to Muon's. This is what chose
``ACCELERATOR_CHUNK_BYTES`` (htmuon/functional.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from htmuon import HTMuon  # noqa: E402
from htmuon import functional as F  # noqa: E402
from machine import describe, header, require_torch_muon, write_json  # noqa: E402
from memory import MIB, measure  # noqa: E402
from step_cost import LR, MODELS, MOMENTUM, WEIGHT_DECAY, matrix_set, muon_row, timed  # noqa: E402


def main() -> None:
    require_torch_muon()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=["60m", "135m"], choices=sorted(MODELS))
    ap.add_argument("--budgets", nargs="+", type=int, default=[32, 48, 64, 128, 256, 512], help="MiB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per timing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = describe(args.device)
    print(header(info))
    out = []
    for model in args.models:
        shapes = matrix_set(model)
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        muon = muon_row().make(params, LR, MOMENTUM, WEIGHT_DECAY)
        muon.step()
        muon_peak = measure(muon, 1, device)["peak"]
        mshapes = [(1, *s) for s in shapes]
        print(f"\n## {model}: {len(shapes)} matrices; torch.optim.Muon's peak {muon_peak / MIB:.1f} MiB\n")
        print("| chunk_bytes | chunks | wall x Muon | spread | peak MiB | peak x Muon |")
        print("|---:|---:|---:|---|---:|---:|")
        for mib in args.budgets:
            opt = HTMuon(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, chunk_bytes=mib * MIB)
            work = [F.work_itemsize(opt.param_groups[0], True, p) for p in params]  # as the step plans
            plan = F.plan_step(shapes, mshapes, [4] * len(shapes), mib * MIB, work)
            opt.step()
            peak = measure(opt, 1, device)["peak"]
            ratios = []
            for r in range(args.rounds):
                pair = [muon, opt] if r % 2 == 0 else [opt, muon]
                t = {id(o): timed(o, args.steps, device)[1] for o in pair}  # wall time
                ratios.append(t[id(opt)] / t[id(muon)])
            row = dict(
                model=model,
                chunk_mib=mib,
                chunks=sum(len(w) for w in plan.windows),
                ratio_wall=ratios,
                ratio_wall_median=statistics.median(ratios),
                peak_bytes=peak,
                muon_peak_bytes=muon_peak,
            )
            out.append(row)
            print(
                f"| {mib} MiB | {row['chunks']} | {row['ratio_wall_median']:.2f} | "
                f"{min(ratios):.2f}-{max(ratios):.2f} | {peak / MIB:.1f} | {peak / max(muon_peak, 1):.1f} |",
                flush=True,
            )
            del opt
    if args.json:
        write_json(args.json, dict(machine=info, args=vars(args), results=out))


if __name__ == "__main__":
    main()
