"""How a distributed HTMuon step divides the spectral work among ranks (no processes are started).

    PYTHONPATH=src python benchmarks/owner_split.py [--worlds 2 4 8]

For the LLaMA-60M hidden matrices (8 blocks x q, k, v, o 512x512, gate, up 1376x512, down
512x1376) and for 4096 x 11008 matrices (LLaMA-7B's MLP shape, 8 of them), with the default
``chunk_bytes``, prints each rank's share of the estimated spectral cost ``m n min(m, n)``:

* ``per window`` -- the step before session 19: the matrices cut into windows of ``chunk_bytes``
  first, owners chosen by :func:`htmuon.distributed.assign_owners` within each window (a window of
  one matrix always went to rank 0);
* ``per step`` -- today's DDP plan (:func:`htmuon.distributed.plan_replicated_step`, what
  ``DistributedStep.plan`` calls): owners for the whole step, each rank's matrices cut into its own
  windows of ``chunk_bytes / world``.

The same functions as the step (``plan_step``, ``assign_owners``, ``plan_replicated_step``), so the
shares are the step's; tests/test_distributed.py counts the matrices each rank computes in real
2-process runs.
"""

from __future__ import annotations

import argparse

from htmuon import functional as F
from htmuon.distributed import assign_owners, matrix_cost, plan_replicated_step

SETS = {
    "LLaMA-60M matrices": ([(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]) * 8,
    "8 x 4096x11008": [(4096, 11008)] * 8,
}


def shares(owners: list[int], costs: list[int], world: int) -> list[float]:
    total = sum(costs)
    return [sum(c for c, o in zip(costs, owners) if o == r) / total for r in range(world)]


def percent(values: list[float]) -> str:
    return " / ".join(f"{x:.1%}" for x in values)


def per_window(shapes: list[tuple[int, int, int]], world: int, budget: int) -> list[int]:
    """The owners the step chose before session 19: window by window."""
    plan = F.plan_step([s[1:] for s in shapes], shapes, [4] * len(shapes), budget)
    owners = [0] * len(shapes)
    for window in plan.windows:
        items = [i for chunk in window for i in chunk]
        for i, o in zip(items, assign_owners([matrix_cost(shapes[i]) for i in items], world)):
            owners[i] = o
    return owners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--chunk-bytes", type=int, default=F.DEFAULT_CHUNK_BYTES)
    args = parser.parse_args()
    print("| matrices | ranks | per window (before) | per step (now) |")
    print("|---|---:|---|---|")
    for name, mats in SETS.items():
        shapes = [(1, m, n) for m, n in mats]
        costs = [matrix_cost(s) for s in shapes]
        for world in args.worlds:
            before = shares(per_window(shapes, world, args.chunk_bytes), costs, world)
            _, owners = plan_replicated_step(
                [s[1:] for s in shapes], shapes, [4] * len(shapes), args.chunk_bytes, world
            )
            now = shares(owners, costs, world)
            print(f"| {name} | {world} | {percent(before)} | {percent(now)} |")


if __name__ == "__main__":
    main()
