"""Where one optimizer step's time goes: operator counts, host syncs and Python hot spots (issue 11).

    PYTHONPATH=src python benchmarks/step_profile.py --device cuda --model 60m --rows muon p0 default

On a GPU a step over small matrices is bound by the host (Python and one kernel launch per operator),
not by the GPU's arithmetic, and every read of a device value on the host (``.item()``, ``bool(t)``,
``nonzero``) waits for all queued work. So for each row (the keys of ``step_cost.py``) this prints
the wall time per step, the operators the step dispatches (top-level ``aten::`` calls: each is at
least one kernel launch on a GPU; and, counted below the composite ones, the computing operators,
about one launch each, and the views, which only cost the host), the host reads of tensor values
among them (a sync when the tensor is on the GPU; on CUDA also where in the code the real syncs are, from
``torch.cuda.set_sync_debug_mode``), and the busiest operators; with
``--python ROW``, also the Python functions with the most own time in that row's steps (cProfile).
Same matrices as step_cost.py: every hidden matrix of the LLaMA-60M / 135M model, fp32 parameters,
Gaussian gradients; one torch thread (``--threads``, as step_cost.py; 0: torch's default).

``--accelerator-paths`` (CPU) runs the steps on the code paths a GPU takes
(:func:`htmuon.spectral.accelerator_paths`: stacked chunks, batched products, no host reads but the
finite checks), so the operators a GPU step dispatches can be counted on a CPU; pass the GPU's
budget with ``--chunk-bytes`` (48MiB is the accelerator default since session 29, 512MiB before it).
Its times are CPU times.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import pstats
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from htmuon.spectral import accelerator_paths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, header  # noqa: E402
from step_cost import (  # noqa: E402
    LR,
    MODELS,
    MOMENTUM,
    WEIGHT_DECAY,
    all_rows,
    chunk_bytes_arg,
    matrix_set,
    sync,
    timed,
)


class DispatchCount(TorchDispatchMode):
    """Counts the operators that reach the kernels (below composite ops such as ``matmul`` or
    ``isfinite``, which the profiler's top level counts as one): ``kernels`` are the ones that compute
    (one launch each on a GPU; ``item`` reads excluded), ``views`` the ones that only make a view
    (no launch, but a dispatch on the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        elif func is not torch.ops.aten._local_scalar_dense.default:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


#: Operators that read a tensor's value on the host: a device sync when the tensor is on the GPU (the
#: count includes reads of CPU tensors; on CUDA ``set_sync_debug_mode`` lists the real syncs).
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="60m")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rows", nargs="+", default=["muon", "p0", "default"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (after two warm-up steps)")
    ap.add_argument("--top", type=int, default=12, help="operators / functions listed per row")
    ap.add_argument("--python", nargs="*", default=["default"], help="rows whose Python hot spots are listed")
    ap.add_argument("--chunk-bytes", type=chunk_bytes_arg, default="auto", help="every HTMuon row's budget")
    ap.add_argument(
        "--accelerator-paths", action="store_true", help="CPU: take the code paths a GPU takes (see above)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with accelerator_paths() if args.accelerator_paths else contextlib.nullcontext():
        run(args)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    print(header(describe(args.device)))
    shapes = matrix_set(args.model, "standard", args.layers)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    rows = {r.key: r for r in all_rows(chunk_bytes=args.chunk_bytes)}
    print(f"# {args.model}: {len(shapes)} matrices\n")
    for key in args.rows:
        row = rows[key]
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt = row.make(params, LR, MOMENTUM, WEIGHT_DECAY)
        timed(opt, 2, device)  # warm-up: state, first-call setup
        ms = timed(opt, args.steps, device)[1] * 1e3
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            opt.step()
            sync(device)
        ops = [e for e in prof.events() if e.name.startswith("aten::")]
        top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
        counts = collections.Counter(e.name for e in top)
        syncs = sum(counts[n] for n in SYNC_OPS)
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        with DispatchCount() as dispatched:
            opt.step()
        print(
            f"## {row.label}: {ms:.1f} ms/step, {len(top)} operators, {syncs} host reads, "
            f"{kernels} GPU kernels; dispatched: {dispatched.kernels} computing ops, {dispatched.views} views"
        )
        print("   " + ", ".join(f"{n[6:]} {c}" for n, c in counts.most_common(args.top)))
        if device.type == "cuda":  # where the host syncs come from: torch warns at each one
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            where = collections.Counter(
                f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
            )
            if where:
                print("   host syncs at: " + ", ".join(f"{k} x{c}" for k, c in where.most_common(args.top)))
        if key in args.python:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.steps):
                opt.step()
            sync(device)
            pr.disable()
            out = io.StringIO()
            pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(args.top)
            lines = [ln for ln in out.getvalue().splitlines() if ln.strip()][-args.top - 1 :]
            print("   python, own time over", args.steps, "steps:\n   " + "\n   ".join(lines))
        del opt, params
        print()


if __name__ == "__main__":
    main()
