"""A size-scan table and gap plot from the results.json of separate ``htmuon compare`` runs.

    python scripts/merge_size_scan.py --out results/size-scan-s21 \
        --add llama-tiny results/size-scan-s18/llama-tiny/results.json \
        --add llama-mini results/size-scan-s21/llama-mini-p/results.json \
        --add llama-mini results/size-scan-s20/llama-mini/results.json:htmuon:method=fast

``htmuon compare --models`` writes size_scan.md itself when one command ran every model. When a
model's optimizers were run by several commands (another session, another machine), each
``--add MODEL PATH[:SPEC]`` adds the reported runs of one results.json (only SPEC's, if given) to
MODEL; the paired differences are then taken to the reference (Muon) runs of that model, seed by
seed. A spec may come from several files when they hold other seeds of the same cell (its lr and
AdamW-part lr): seeds of a long run added session by session. A seed of a spec found in two files,
or one spec's cells with other lrs in another file, is refused. The table says which files each spec
came from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from htmuon.train.compare import _report_runs, aggregate, write_size_scan
from htmuon.train.data import atomic_write_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for size_scan.md and gap_vs_params.png")
    ap.add_argument("--name", default="size-scan (merged)")
    ap.add_argument("--add", nargs=2, action="append", metavar=("MODEL", "PATH[:SPEC]"), required=True)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    sources: dict[str, dict[str, list[str]]] = {}
    seen: dict[tuple, str] = {}  # (model, spec, seed) -> the file it came from
    cells: dict[tuple, tuple] = {}  # (model, spec) -> its (lr, AdamW-part lr)
    for model, where in args.add:
        path, _, spec = where.partition(":")
        res = json.loads(Path(path).read_text(encoding="utf-8"))
        picked = [r for r in _report_runs(res) if not spec or r["spec"] == spec]
        if not picked:
            sys.exit(f"merge_size_scan: no reported runs{f' of {spec!r}' if spec else ''} in {path}")
        for r in picked:
            key = (model, r["spec"], r["seed"])
            if key in seen:
                sys.exit(
                    f"merge_size_scan: {model}: seed {r['seed']} of {r['spec']!r} comes from both "
                    f"{seen[key]} and {path}"
                )
            seen[key] = path
            cell = (r["lr"], r.get("adamw_lr"))
            if cells.setdefault((model, r["spec"]), cell) != cell:
                sys.exit(
                    f"merge_size_scan: {model}: {r['spec']!r} has the cell lr {cell[0]:g} / AdamW-part lr "
                    f"{cell[1]} in {path}, not the {cells[model, r['spec']]} of the runs added before"
                )
            files = sources.setdefault(model, {}).setdefault(r["spec"], [])
            if path not in files:
                files.append(path)
        runs.setdefault(model, []).extend(picked)
    per_model = {m: {"agg": aggregate(rs), "runs": rs} for m, rs in runs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_size_scan(args.out, args.name, list(per_model), per_model, no_plots=False)
    md = args.out / "size_scan.md"
    lines = ["", "Sources (each spec's reported runs):", ""]
    lines += [
        f"- {m}: {s} from " + " and ".join(f"`{p}`" for p in paths)
        for m, specs in sources.items()
        for s, paths in specs.items()
    ]
    atomic_write_bytes(md, (md.read_text(encoding="utf-8") + "\n".join(lines) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
