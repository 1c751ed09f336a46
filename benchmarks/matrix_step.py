"""Whole optimizer steps on ONE matrix against torch.optim.Muon's: where the eager gap comes from.

    PYTHONPATH=src python benchmarks/matrix_step.py                       # 60M shapes, 12 rounds
    PYTHONPATH=src python benchmarks/matrix_step.py --shapes 768x768 --rounds 20 --json out.json

``benchmarks/step_cost.py`` times the step on a model's whole matrix set; this script takes one
matrix at a time, so that a row's excess over ``torch.optim.Muon`` can be read per shape. Rows:

  [muon]            torch.optim.Muon (bf16 Newton--Schulz, lr 0.02, wd 0.1), the reference
  [p0]              HTMuon(p=0, method="ns"): the same map, bit-identical update (tests/test_optim.py);
                    its excess is the step's own machinery: the finite checks, the third pass of
                    the momentum (the step commits it only once everything is known to be good),
                    and Python
  [p0_nocheck]      the same with check_finite=False (no gradient / direction checks)
  [fast5], [fast]   HTMuon(p=0.125) with the fast backends (ns_dtype="auto")
  [fast5_nocheck]   fast5 with check_finite=False

Each optimizer steps on its own parameter with a fixed random gradient. The rows are timed
interleaved round-robin (``--steps`` steps per row and round), and a row's ratio to Muon is the
median over rounds of the per-round ratio, in CPU time (``time.process_time``), so the ratio holds
on a shared, noisy machine as long as the noise is slower than a round. One torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from htmuon import HTMuon  # noqa: E402
from machine import describe, header, require_torch_muon, round_order, write_json  # noqa: E402

LR, WEIGHT_DECAY = 0.02, 0.1
ROWS = {
    "muon": lambda ps: torch.optim.Muon(ps, lr=LR, weight_decay=WEIGHT_DECAY, adjust_lr_fn="match_rms_adamw"),
    "p0": lambda ps: HTMuon(ps, lr=LR, weight_decay=WEIGHT_DECAY, p=0.0, method="ns", lr_adjust="adamw_rms"),
    "p0_nocheck": lambda ps: HTMuon(
        ps, lr=LR, weight_decay=WEIGHT_DECAY, p=0.0, method="ns", lr_adjust="adamw_rms", check_finite=False
    ),
    "fast5": lambda ps: HTMuon(ps, lr=LR, weight_decay=WEIGHT_DECAY, method="fast5"),
    "fast5_nocheck": lambda ps: HTMuon(
        ps, lr=LR, weight_decay=WEIGHT_DECAY, method="fast5", check_finite=False
    ),
    "fast": lambda ps: HTMuon(ps, lr=LR, weight_decay=WEIGHT_DECAY, method="fast"),
}


def measure(shape: tuple[int, int], rounds: int, steps: int, seed: int) -> dict[str, list[float]]:
    """CPU milliseconds per step of every row, per round."""
    g = torch.Generator().manual_seed(seed)
    opts = {}
    for name, make in ROWS.items():
        p = torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.02)
        p.grad = torch.randn(*shape, generator=g)
        opts[name] = make([p])
        opts[name].step()  # state allocation, first-call overheads
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for r in range(rounds):
        for name in round_order(list(ROWS), r):
            opt = opts[name]
            t0 = time.process_time()
            for _ in range(steps):
                opt.step()
            times[name].append((time.process_time() - t0) / steps * 1e3)
    return times


def main() -> None:
    require_torch_muon()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["512x512", "512x1376", "1376x512"])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4, help="steps per row and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every per-round time here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = describe()
    print(header(info))
    print("| shape | " + " | ".join(ROWS) + " |")
    print("|---|" + "---:|" * len(ROWS))
    payload = {"machine": info, "args": vars(args), "times_ms": {}}
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        times = measure(shape, args.rounds, args.steps, args.seed)
        payload["times_ms"][text] = times
        cells = []
        for name in ROWS:
            ratio = statistics.median(a / b for a, b in zip(times[name], times["muon"]))
            cells.append(f"{statistics.median(times[name]):.2f} ms" if name == "muon" else f"{ratio:.2f}x")
        print(f"| {text} | " + " | ".join(cells) + " |")
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
