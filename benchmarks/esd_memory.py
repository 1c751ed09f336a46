"""Peak memory of ``htmuon esd`` on a synthetic checkpoint, per format, vs the checkpoint's size.

Writes a checkpoint of ``--layers`` float32 matrices of ``--shape`` (default 100 x 2048 x 512:
400 MiB) as a safetensors file, a Hugging Face sharded safetensors folder, a ``torch.save`` file
(zip) and a torch.distributed.checkpoint folder, then analyses each in a fresh process while the
parent samples ``/proc/<pid>/status`` every 5 ms. Reported per run: peak RSS (VmHWM), peak
anonymous RSS (private memory: what the process really allocates) and peak file-backed RSS
(mapped checkpoint pages; clean page cache the kernel can drop). The row ``in memory`` is the
old way: ``torch.load`` of the whole file, then ``analyze`` of the state_dict; ``import only``
is the same process that imports torch and htmuon.diagnostics and stops (the floor).

    PYTHONPATH=src python benchmarks/esd_memory.py [--layers 100] [--shape 2048 512] [--dir /tmp/x]
        [--only "safetensors file" "in memory"]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

CHILD = r"""
import sys, time, json, torch
from htmuon.diagnostics import analyze
fmt, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if fmt == "import only":
    print(json.dumps({"layers": 0, "mean_alpha": float("nan"), "s": 0.0}))
    sys.exit()
if fmt == "in memory":
    rep = analyze(torch.load(path, map_location="cpu", weights_only=True)["model"])
else:
    rep = analyze(path)
print(json.dumps({"layers": len(rep), "mean_alpha": rep.mean_alpha, "s": time.perf_counter() - t}))
"""


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) // 1024  # MiB
    return out


def measure(fmt: str, path: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, fmt, path], stdout=subprocess.PIPE, text=True, env=env
    )
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    base: dict[str, int] = {}

    def poll() -> None:
        while proc.poll() is None:
            try:
                s = _status(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            base.setdefault("RssAnon", s.get("RssAnon", 0))
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.005)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, _ = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{fmt}: the analysis failed (rc {proc.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), **peak}


def folder_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--shape", type=int, nargs=2, default=(2048, 512))
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp folder)")
    ap.add_argument("--only", nargs="+", metavar="FORMAT", help="measure only these rows (names as printed)")
    args = ap.parse_args()

    import warnings

    import torch.distributed.checkpoint as dcp
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.proj.weight": torch.randn(*args.shape, generator=g) for i in range(args.layers)}
    root = args.dir or tempfile.mkdtemp(prefix="esd-memory-")
    os.makedirs(root, exist_ok=True)
    paths = {
        "safetensors file": os.path.join(root, "model.safetensors"),
        "HF sharded safetensors": os.path.join(root, "hf"),
        "torch.save (zip, mmap)": os.path.join(root, "ckpt.pt"),
        "DCP folder": os.path.join(root, "dcp"),
    }
    save_file(sd, paths["safetensors file"])
    split = split_torch_state_dict_into_shards(sd, max_shard_size="100MB")
    os.makedirs(paths["HF sharded safetensors"], exist_ok=True)
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, os.path.join(paths["HF sharded safetensors"], fname))
    with open(os.path.join(paths["HF sharded safetensors"], "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f)
    torch.save({"model": sd, "step": 1}, paths["torch.save (zip, mmap)"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd, "step": 1}, checkpoint_id=paths["DCP folder"], no_dist=True)
    del sd, split

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe, header

    print(header(describe()))
    size = folder_size(paths["safetensors file"]) / 2**20
    print(f"checkpoint: {args.layers} x {args.shape[0]}x{args.shape[1]} float32 = {size:.0f} MiB; in {root}")
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}")
    print()
    print("| format | size MiB | peak RSS MiB | peak anon MiB | peak file-backed MiB | time s | mean alpha |")
    print("|---|---|---|---|---|---|---|")
    runs = [("import only", root), *paths.items(), ("in memory", paths["torch.save (zip, mmap)"])]
    for fmt, path in runs:
        if args.only and fmt not in args.only and fmt != "import only":
            continue
        r = measure(fmt, path)
        print(
            f"| {fmt} | {'-' if fmt == 'import only' else f'{folder_size(path) / 2**20:.0f}'} "
            f"| {r['VmHWM']} | {r['RssAnon']} | {r['RssFile']} "
            f"| {r['s']:.1f} | {r['mean_alpha']:.4f} |"
        )


if __name__ == "__main__":
    main()
