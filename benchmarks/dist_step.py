"""Benchmark: the distributed HTMuon optimizer step on LLaMA-60M's matrix set (not part of the tests).

Times one optimizer step (gradients given) and counts the bytes each rank sends/receives, for:

* ``single``      -- 1 process, the plain single-process step (the baseline);
* ``ddp``         -- N processes, replicated parameters, ``process_group=WORLD``: divided, one all_gather;
* ``ddp_naive``   -- N processes, replicated parameters, every rank computing every matrix (no traffic);
* ``fsdp``        -- N processes, DTensor (Shard(0)) parameters: owners, two all-to-alls;
* ``fsdp_naive``  -- N processes, sharded gradients all-gathered to every rank, every rank computing every
  matrix (the naive way to run a whole-matrix optimizer on FSDP shards).

Usage::

    PYTHONPATH=src python benchmarks/dist_step.py --world 2 --method svd --steps 3 [--layers 8] [--threads 1]

Each process uses ``--threads`` threads, so on a machine with N * threads free cores the N-process wall
times are comparable with the 1-process time. The CPU seconds of the busiest rank measure the work
split whatever the machine's load (on a loaded machine the wall time of N processes is not). Timings
on a shared machine are noisy: compare ratios within one run. On CUDA (``--device cuda``, NCCL) each
rank uses its own GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import htmuon

MODES = ("single", "ddp", "ddp_naive", "fsdp", "fsdp_naive")


def llama_shapes(layers: int = 8, hidden: int = 512, intermediate: int = 1376) -> list[tuple[int, int]]:
    """The hidden matrices of LLaMA-60M (the paper's smallest model): per layer q, k, v, o, gate, up, down."""
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return per_layer * layers


def make_tensors(shapes: list[tuple[int, int]], device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    return [p.to(device) for p in params], [x.to(device) for x in grads]


def run(mode: str, rank: int, world: int, args: argparse.Namespace) -> dict:
    device = args.device if args.device == "cpu" else f"cuda:{rank}"
    shapes = llama_shapes(args.layers)
    full_params, full_grads = make_tensors(shapes, device)
    options = dict(lr=0.02, p=args.p, method=args.method, interval=args.interval, plugin=args.plugin)
    item = full_grads[0].element_size()
    naive_bytes = 0
    if mode in ("single", "ddp_naive", "ddp"):
        params = [torch.nn.Parameter(p) for p in full_params]
        for p, g in zip(params, full_grads):
            p.grad = g
        opt = htmuon.HTMuon(params, **options, process_group=dist.group.WORLD if mode == "ddp" else None)
        step = opt.step
    else:
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        mesh = init_device_mesh(args.device, (world,))
        sharded = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in full_params]
        sharded_grads = [distribute_tensor(g, mesh, [Shard(0)]) for g in full_grads]
        if mode == "fsdp":
            for p, g in zip(sharded, sharded_grads):
                p.grad = g
            opt = htmuon.HTMuon(sharded, **options)
            step = opt.step
        else:  # every rank gathers every whole gradient and computes every matrix
            params = [torch.nn.Parameter(p) for p in full_params]
            opt = htmuon.HTMuon(params, **options)
            naive_bytes = sum(g.numel() - g.to_local().numel() for g in sharded_grads) * item

            def step() -> None:
                for p, g in zip(params, sharded_grads):
                    p.grad = g.full_tensor()
                opt.step()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    step()  # warm-up (state creation, first-call overheads)
    stats = opt._dist.stats if opt._dist is not None else None
    if stats is not None:
        stats.reset()
    times, cpu = [], []
    for _ in range(args.steps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        cpu.append(time.process_time() - c0)  # this rank's own work, whatever the machine's load
        sync()
        times.append(time.perf_counter() - t0)
    sent = stats.bytes_sent / args.steps if stats else naive_bytes
    received = stats.bytes_received / args.steps if stats else naive_bytes
    return {
        "mode": mode,
        "rank": rank,
        "world": world,
        "times": times,
        "cpu": cpu,
        "sent": sent,
        "received": received,
    }


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.world > 1:
        backend = "gloo" if args.device == "cpu" else "nccl"
        dist.init_process_group(
            backend, init_method=f"file://{args.rendezvous}", rank=args.rank, world_size=args.world
        )
    result = run(args.mode, args.rank, args.world, args)
    Path(args.out, f"{args.mode}-{args.rank}.json").write_text(json.dumps(result))
    if args.world > 1:
        dist.destroy_process_group()


def launch(mode: str, world: int, args: argparse.Namespace, out: str) -> list[dict]:
    rendezvous = os.path.join(out, f"rdv-{mode}")
    base = [sys.executable, __file__, "--mode", mode, "--world", str(world), "--out", out]
    base += ["--rendezvous", rendezvous, "--steps", str(args.steps), "--layers", str(args.layers)]
    base += ["--method", args.method, "--p", str(args.p), "--interval", str(args.interval)]
    base += ["--threads", str(args.threads), "--device", args.device]
    if args.plugin:
        base += ["--plugin", args.plugin]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    procs = [subprocess.Popen(base + ["--rank", str(r)], env=env) for r in range(world)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"{mode}: a worker failed")
    return [json.loads(Path(out, f"{mode}-{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="processes for the distributed modes")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--layers", type=int, default=8, help="LLaMA layers (60M: 8)")
    ap.add_argument("--method", default="svd")
    ap.add_argument("--p", type=float, default=0.125)
    ap.add_argument("--interval", type=int, default=1)
    ap.add_argument("--plugin", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rendezvous", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        worker(args)
        return
    shapes = llama_shapes(args.layers)
    total = sum(m * n for m, n in shapes) * 4
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe, header

    print(header(describe(args.device)))
    print(
        f"LLaMA-60M matrix set: {len(shapes)} matrices, {total / 2**20:.1f} MiB fp32; method={args.method} "
        f"p={args.p} interval={args.interval} plugin={args.plugin}; {args.threads} thread(s) per process"
    )
    print(
        f"{'mode':<11} {'ranks':>5} {'wall s/step':>12} {'vs single':>10} {'CPU s/step/rank':>16} "
        f"{'vs single':>10} {'MiB sent/rank':>14}",
        flush=True,
    )
    base = base_cpu = None
    with tempfile.TemporaryDirectory() as out:
        for mode in args.modes.split(","):
            world = 1 if mode == "single" else args.world
            results = launch(mode, world, args, out)
            per_step = [max(r["times"][i] for r in results) for i in range(args.steps)]
            mean = sum(per_step) / len(per_step)
            cpu = max(sum(r["cpu"]) / len(r["cpu"]) for r in results)  # the busiest rank
            if mode == "single":
                base, base_cpu = mean, cpu
            ratio = f"{mean / base:.2f}x" if base else "-"
            cpu_ratio = f"{cpu / base_cpu:.2f}x" if base_cpu else "-"
            sent = max(r["sent"] for r in results) / 2**20
            print(
                f"{mode:<11} {world:>5} {mean:>12.3f} {ratio:>10} {cpu:>16.3f} {cpu_ratio:>10} {sent:>14.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
