"""The periodic validation windows of several training runs, paired by step, as one CSV.

    python scripts/val_windows.py --out results/size-scan-s34/llama-small-seed2/val_windows.csv \
        --run muon runs/small/muon/lr0.01-alr0.0333/seed2 \
        --run "htmuon p=1/32" "runs/small/htmuon__method=fast_p=0.03125/lr0.01-alr0.0333/seed2"

Each ``--run NAME RUN_DIR`` names a run folder of ``htmuon train`` / ``htmuon compare`` (its
``metrics.jsonl``; a compare cell's folder names hold ``=``, hence two arguments); the first is the
reference. The CSV has a column per run, a row per step at which
every run evaluated (``kind: "val"`` rows: the periodic windows, and at the last step the final
evaluation on the whole held-out split). A run resumed from a checkpoint logs the steps after it
again: the last value of a step is kept, as the resumed run's. ``--every K`` also prints each run's
difference to the reference at every K-th step (and the last), the numbers RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from htmuon.train.data import atomic_write_bytes
from htmuon.train.loop import read_metrics


def val_losses(run_dir: Path) -> dict[int, float]:
    """``{step: validation loss}`` from a run folder's metrics.jsonl, read by the harness's own
    :func:`~htmuon.train.loop.read_metrics` (a line torn by a kill is dropped; the last value of a
    step wins)."""
    path = run_dir / "metrics.jsonl"
    out = {int(r["step"]): float(r["loss"]) for r in read_metrics(path) if r.get("kind") == "val"}
    if not out:
        raise ValueError(f"{path}: no validation rows (kind 'val')")
    return out


def paired(runs: dict[str, dict[int, float]]) -> list[tuple[int, list[float]]]:
    """The steps every run evaluated at, in order, with each run's loss (in ``runs``' order)."""
    common = set.intersection(*(set(v) for v in runs.values()))
    return [(s, [runs[name][s] for name in runs]) for s in sorted(common)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run",
        nargs=2,
        action="append",
        required=True,
        metavar=("NAME", "RUN_DIR"),
        help="the first: reference",
    )
    ap.add_argument("--out", type=Path, required=True, help="the CSV to write")
    ap.add_argument("--every", type=int, default=500, help="print the differences every K steps (0: none)")
    args = ap.parse_args(argv)
    names = [name for name, _ in args.run]
    if len(set(names)) != len(names):
        ap.error(f"run names must differ, got {names}")
    try:
        runs = {name: val_losses(Path(where)) for name, where in args.run}
    except (OSError, ValueError) as exc:
        print(f"val_windows: {exc}", file=sys.stderr)
        return 1
    rows = paired(runs)
    if not rows:
        print("val_windows: the runs share no evaluation step", file=sys.stderr)
        return 1
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", *names])
    for step, losses in rows:
        writer.writerow([step, *(f"{v:.4f}" for v in losses)])
    atomic_write_bytes(args.out, buf.getvalue().encode())
    print(f"wrote {args.out}: {len(rows)} steps")
    if args.every:
        last = rows[-1][0]
        for step, losses in rows:
            if step % args.every == 0 or step == last:
                diffs = ", ".join(f"{n} {v - losses[0]:+.3f}" for n, v in zip(names[1:], losses[1:]))
                print(f"step {step}: {diffs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
