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
is not copied (listed with its last logged step); a finished one whose summary or config is damaged
or missing is named and not copied, and the others go on. A cell already at DEST with the same
``summary.json`` is skipped (its checkpoints there or not); a DEST cell that holds anything else
(another config or summary, a checkpoint or a lock: a run there) is left as it is and named. The exit
status is 1 if any cell was refused. Each DEST cell is written under its ``cell.lock`` (compare's:
a compare starting the cell meanwhile waits for it), each file atomically, ``summary.json`` last, so a
copy cut short is not a finished cell (a second call completes it). SRC and DEST must not hold one
another; symlinked folders are not followed. A restored cell is reused as it is, like any finished
cell: compare does not check that the data given now is the data it trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from htmuon.errors import UserError
from htmuon.train.config import from_dict
from htmuon.train.data import atomic_write_bytes
from htmuon.train.locks import acquire_lock, describe_owner, lock_is_stale, release_lock
from htmuon.train.loop import read_json, read_metrics

SUMMARY = "summary.json"
CONFIG = "config.json"
LOCK = "cell.lock"  # compare's lock of a cell (htmuon.train.compare.LOCK_NAME)
#: Files of a run itself, never in a record: checkpoints (also a damaged one set aside) and locks (also
#: a lock takeover's leftover). In a destination cell they mean a run there.
RUN_SUFFIXES = (".pt", ".pt.corrupt", ".lock", ".lock.takeover")


def left_out(name: str) -> bool:
    """Files a kept record leaves out: the run's own (:data:`RUN_SUFFIXES`) and temp files."""
    return name.endswith(RUN_SUFFIXES) or (name.startswith(".") and ".tmp" in name)


def record_files(cell: Path) -> list[Path]:
    """The files of ``cell``'s record, ``summary.json`` last (it makes a copy a finished cell)."""
    files = [p for p in sorted(cell.iterdir()) if p.is_file() and not left_out(p.name)]
    return sorted(files, key=lambda p: p.name == SUMMARY)


def run_folders(root: Path) -> list[Path]:
    """Every run folder under ``root`` (a folder with a ``config.json`` or a ``summary.json``), in path
    order. Symlinked folders are not followed (``Path.rglob``)."""
    return sorted({p.parent for name in (CONFIG, SUMMARY) for p in root.rglob(name)})


def finished(cell: Path) -> bool:
    """Whether the run in ``cell`` ended (its summary says finished or diverged); a damaged summary is a
    UserError naming the file."""
    if not (cell / SUMMARY).is_file():
        return False
    summary = read_json(cell / SUMMARY, "run summary")
    return bool(summary.get("finished") or summary.get("diverged"))


def last_step(cell: Path) -> int:
    path = cell / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    return max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)


def unusable(cell: Path) -> str | None:
    """Why a finished cell's record would not be reused where it is copied (no checkpoint there to
    rebuild its config from), or None."""
    if not (cell / CONFIG).is_file():
        return (
            f"it has no {CONFIG} (its checkpoint holds the config: resume it once with compare to write it)"
        )
    try:
        from_dict(read_json(cell / CONFIG, "run config"), where=f" in {cell / CONFIG}")
    except UserError as e:
        return str(e)
    return None


def conflict(src: Path, dest: Path) -> str | None:
    """Why ``dest`` must not receive ``src``'s record, or None (absent, a copy cut short, or the same
    finished run already, with or without its checkpoints). ``dest``'s cell lock is this process's."""
    if not dest.exists():
        return None
    if not dest.is_dir():
        return "it is not a folder"
    if (dest / SUMMARY).is_file() and (dest / SUMMARY).read_bytes() == (src / SUMMARY).read_bytes():
        return None
    names = sorted(p.name for p in dest.iterdir() if p.name != LOCK)
    held = [n for n in names if n.endswith(RUN_SUFFIXES)]
    if held:
        return f"it holds {', '.join(held)} (a run there)"
    for name in (CONFIG, SUMMARY):
        if name in names and (dest / name).read_bytes() != (src / name).read_bytes():
            return f"its {name} differs from the one to copy (another run)"
    return None


def copy_cell(cell: Path, dest: Path, dry_run: bool) -> tuple[str, str]:
    """``(outcome, detail)``: outcome "copied", "same" or "refused". Under the destination cell's lock,
    so a ``compare`` that would start the cell there waits, or holds it and the cell is refused."""
    if (dest / LOCK).exists() and not lock_is_stale(dest / LOCK):  # a compare runs the cell there
        return "refused", f"a process holds its {LOCK} ({describe_owner(dest / LOCK)})"
    if dry_run or (dest.exists() and not dest.is_dir()):
        why = conflict(cell, dest)
        return ("refused", why) if why else ("same" if (dest / SUMMARY).is_file() else "copied", "")
    dest.mkdir(parents=True, exist_ok=True)
    if not acquire_lock(dest / LOCK):
        return "refused", f"a process holds its {LOCK} ({describe_owner(dest / LOCK)})"
    try:
        why = conflict(cell, dest)
        if why:
            return "refused", why
        if (dest / SUMMARY).is_file():
            return "same", ""
        for p in record_files(cell):
            atomic_write_bytes(dest / p.name, p.read_bytes())
        return "copied", ""
    finally:
        release_lock(dest / LOCK)


def keep(src_root: Path, dest_root: Path, dry_run: bool = False) -> int:
    cells = run_folders(src_root)
    if not cells:
        print(f"keep_cells: no run folders (config.json) under '{src_root}'", file=sys.stderr)
        return 1
    counts = dict(copied=0, same=0, refused=0, unfinished=0)
    for cell in cells:
        rel = cell.relative_to(src_root)
        try:
            if not finished(cell):
                counts["unfinished"] += 1
                print(f"not finished: {rel} (step {last_step(cell)}): not copied")
                continue
            why = unusable(cell)
            outcome, detail = ("refused", why) if why else copy_cell(cell, dest_root / rel, dry_run)
        except (OSError, UserError) as e:  # one damaged cell: named, the others go on
            outcome, detail = "refused", str(e)
        counts[outcome] += 1
        if outcome == "refused":
            print(f"refused: {rel}: {detail}; not copied", file=sys.stderr)
        elif outcome == "copied":
            files = record_files(cell)
            size = sum(p.stat().st_size for p in files)
            print(f"{'would copy' if dry_run else 'copied'}: {rel} ({len(files)} files, {size / 1e3:.0f} kB)")
    print(
        f"keep_cells: {counts['copied']} cell(s) {'to copy' if dry_run else 'copied'}, {counts['same']} "
        f"already at '{dest_root}', {counts['refused']} refused, {counts['unfinished']} not finished"
    )
    return 1 if counts["refused"] else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a compare --out-dir (or a folder of kept records)")
    ap.add_argument("dest", type=Path, help="where the records go (same relative paths)")
    ap.add_argument("--dry-run", action="store_true", help="list what would be copied, copy nothing")
    args = ap.parse_args(argv)
    src, dest = args.src.resolve(), args.dest.resolve()
    if src == dest or src in dest.parents or dest in src.parents:
        ap.error(f"SRC '{args.src}' and DEST '{args.dest}' must not be one folder or hold one another")
    try:
        return keep(args.src, args.dest, args.dry_run)
    except OSError as exc:
        print(f"keep_cells: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
