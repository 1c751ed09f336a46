"""ESD analysis speed: htmuon.diagnostics.analyze vs WeightWatcher 0.7.7's analyze(), one process.

The model has the LLaMA-60M shapes (hidden 512, intermediate 1376, 8 blocks; with --full also the
32000 x 512 embedding and LM head). Both tools analyse the same CPU model in float64; the runs are
interleaved (ours, theirs, ours, ...) so load from other processes hits both alike; the median
and best wall time and the median CPU time of ``--repeats`` runs are reported with their ratios
(with one thread each, CPU time is the measure least disturbed by other processes). Alphas are
compared too.

WeightWatcher is not an htmuon dependency; run under a virtualenv that has it::

    PYTHONPATH=src /work/venv-ww/bin/python benchmarks/esd_speed.py [--full] [--repeats 5]

On a shared, loaded machine pin both tools to one thread each (OpenMP spin-waiting makes 2-thread
timings erratic when other processes compete for the cores)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src \
        /work/venv-ww/bin/python benchmarks/esd_speed.py

Without WeightWatcher installed only our timings are printed. With a CUDA device, our GPU
timings (float32 svd, float64 gram) are printed as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_ww_reference import Block, TinyLlama  # noqa: E402

from htmuon.diagnostics import analyze  # noqa: E402
from machine import describe, header  # noqa: E402


def _time(fn, sync=None):
    """(wall seconds, CPU seconds of this process, result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="include the 32000x512 embedding and LM head")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fit", default="ks")
    args = ap.parse_args(argv)

    print(header(describe()))
    torch.manual_seed(0)
    if args.full:
        model = TinyLlama(vocab=32000, n_layers=8)
    else:
        model = torch.nn.ModuleList(Block(512, 1376, 8) for _ in range(8))
    n = len(analyze(model).rows)
    print(f"model: LLaMA-60M shapes, {'with' if args.full else 'without'} embedding/LM head; {n} matrices")
    blas = ""
    try:
        from threadpoolctl import threadpool_info

        blas = ", BLAS threads " + ",".join(
            f"{i['internal_api']}={i['num_threads']}" for i in threadpool_info()
        )
    except ImportError:
        pass
    print(
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}{blas}, "
        f"cpu count {os.cpu_count()}"
    )

    try:
        import weightwatcher as ww

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        watcher = ww.WeightWatcher(model=model)
        print(f"weightwatcher {ww.__version__}")
    except ImportError:
        watcher = None
        print("weightwatcher not installed: timing htmuon only")

    ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
    rep = details = None
    analyze(model, fit=args.fit)  # warm-up (first-call allocations, lazy imports)
    for _ in range(args.repeats):
        t, c, rep = _time(lambda: analyze(model, fit=args.fit))
        ours.append(t)
        ours_cpu.append(c)
        if watcher is not None:
            t, c, details = _time(lambda: watcher.analyze())
            theirs.append(t)
            theirs_cpu.append(c)

    def fmt(ts, cs):
        return (
            f"wall median {statistics.median(ts):.3f} s, best {min(ts):.3f} s; "
            f"CPU median {statistics.median(cs):.3f} s (n={len(ts)})"
        )

    print(f"htmuon analyze (cpu float64, {rep.meta['method']}): {fmt(ours, ours_cpu)}")
    if watcher is not None:
        print(f"weightwatcher analyze():                {fmt(theirs, theirs_cpu)}")
        print(
            f"speed-up: {statistics.median(theirs) / statistics.median(ours):.2f}x (median wall), "
            f"{min(theirs) / min(ours):.2f}x (best wall), "
            f"{statistics.median(theirs_cpu) / statistics.median(ours_cpu):.2f}x (median CPU time)"
        )
        ww_alpha = dict(zip(details["longname"], details["alpha"]))
        diffs = [abs(a - ww_alpha[k]) for k, a in rep.alphas.items() if k in ww_alpha]
        print(f"alpha agreement: {len(diffs)} layers, max |delta alpha| = {max(diffs):.2e}")

    if torch.cuda.is_available():
        gpu = model.to("cuda")
        for dt, label in ((torch.float32, "cuda float32 svd"), (torch.float64, "cuda float64 gram")):
            analyze(gpu, fit=args.fit, dtype=dt)
            runs = [_time(lambda dt=dt: analyze(gpu, fit=args.fit, dtype=dt), torch.cuda.synchronize)
                    for _ in range(args.repeats)]  # fmt: skip
            ts = [r[0] for r in runs]
            print(
                f"htmuon analyze ({label}, {torch.cuda.get_device_name()}): {fmt(ts, [r[1] for r in runs])}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
