"""Copy the finished cells of a ``compare`` run folder, without their checkpoints, to another folder.

    python scripts/keep_cells.py runs/s37/small-tune results/small-tune     # keep (commit DEST)
    python scripts/keep_cells.py results/small-tune runs/s37/small-tune     # restore on a new machine

A long study (RESULTS.md's llama-small tuning: ~4 h of one core per cell) is built up over many
sessions on machines that do not keep their disks: a run folder lost with its machine loses every
finished cell in it. A finished cell's record is small (``config.json``, ``run.json``, ``summary.json``,
``metrics.jsonl``, ``metrics.csv``: ~0.2 MB), its checkpoints are not (~190 MB at 22.8 M parameters).
This copies each finished (or diverged) cell's record to DEST under the same relative path, leaving
out its checkpoints (``*.pt``, ``*.pt.corrupt``), locks and temp files. ``compare`` reuses such a cell
as it reuses one whose checkpoints were deleted (docs/harness.md): it is not trained again, its
summary's loss and mean alpha enter the table, and ``alpha.png`` leaves it out, with a note.

The same command copies the kept records back into a new run folder. A cell that has not finished
is not copied (listed with its last logged step). A cell already at DEST with the same
``summary.json`` is skipped (its checkpoints there or not); a DEST cell that holds anything else
(another config or summary, a checkpoint or a lock: a run there) is left as it is and named, and the
exit status is 1. Each file is written atomically, ``summary.json`` last, so a copy cut short is not
a finished cell (a second call completes it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from htmuon.errors import UserError
from htmuon.train.data import atomic_write_bytes
from htmuon.train.loop import read_json, read_metrics

SUMMARY = "summary.json"


def left_out(name: str) -> bool:
    """Files a kept record leaves out: checkpoints (also a damaged one set aside), locks, temp files."""
    return name.endswith((".pt", ".pt.corrupt", ".lock")) or (name.startswith(".") and ".tmp" in name)


def run_folders(root: Path) -> list[Path]:
    """Every run folder under ``root`` (a folder with a ``config.json``), in path order."""
    return sorted(p.parent for p in root.rglob("config.json"))


def finished(cell: Path) -> bool:
    """Whether the run in ``cell`` ended (its summary says finished or diverged)."""
    if not (cell / SUMMARY).is_file():
        return False
    summary = read_json(cell / SUMMARY, "run summary")
    return bool(summary.get("finished") or summary.get("diverged"))


def last_step(cell: Path) -> int:
    path = cell / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    return max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)


def conflict(src: Path, dest: Path) -> str | None:
    """Why ``dest`` must not receive ``src``'s record, or None (absent, a copy cut short, or the same
    finished run already, with or without its checkpoints)."""
    if not dest.exists():
        return None
    if not dest.is_dir():
        return "it is not a folder"
    if (dest / SUMMARY).is_file() and (dest / SUMMARY).read_bytes() == (src / SUMMARY).read_bytes():
        return None
    names = sorted(p.name for p in dest.iterdir())
    held = [n for n in names if n.endswith((".pt", ".pt.corrupt", ".lock"))]
    if held:
        return f"it holds {', '.join(held)} (a run there)"
    for name in ("config.json", SUMMARY):
        if name in names and (dest / name).read_bytes() != (src / name).read_bytes():
            return f"its {name} differs from the one to copy (another run)"
    return None


def keep(src_root: Path, dest_root: Path, dry_run: bool = False) -> int:
    cells = run_folders(src_root)
    if not cells:
        print(f"keep_cells: no run folders (config.json) under '{src_root}'", file=sys.stderr)
        return 1
    copied = same = refused = 0
    for cell in cells:
        rel = cell.relative_to(src_root)
        if not finished(cell):
            print(f"not finished: {rel} (step {last_step(cell)}): not copied")
            continue
        dest = dest_root / rel
        why = conflict(cell, dest)
        if why:
            refused += 1
            print(f"refused: {dest}: {why}; left as it is", file=sys.stderr)
            continue
        if (dest / SUMMARY).is_file():
            same += 1
            continue
        files = [p for p in sorted(cell.iterdir()) if p.is_file() and not left_out(p.name)]
        files.sort(key=lambda p: p.name == SUMMARY)  # summary.json last: it makes the cell finished
        size = sum(p.stat().st_size for p in files)
        if not dry_run:
            for p in files:
                atomic_write_bytes(dest / p.name, p.read_bytes())
        copied += 1
        verb = "would copy" if dry_run else "copied"
        print(f"{verb}: {rel} ({len(files)} files, {size / 1e3:.0f} kB)")
    print(
        f"keep_cells: {copied} cell(s) {'to copy' if dry_run else 'copied'}, {same} already at "
        f"'{dest_root}', {refused} refused, {len(cells) - copied - same - refused} not finished"
    )
    return 1 if refused else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a compare --out-dir (or a folder of kept records)")
    ap.add_argument("dest", type=Path, help="where the records go (same relative paths)")
    ap.add_argument("--dry-run", action="store_true", help="list what would be copied, copy nothing")
    args = ap.parse_args(argv)
    if args.src.resolve() == args.dest.resolve():
        ap.error(f"SRC and DEST are the same folder: '{args.src}'")
    try:
        return keep(args.src, args.dest, args.dry_run)
    except (OSError, UserError) as exc:
        print(f"keep_cells: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
