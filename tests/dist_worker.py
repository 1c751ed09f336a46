"""One rank of the distributed parity tests (launched by tests/test_distributed.py, 2 CPU processes, gloo).

Usage: ``python tests/dist_worker.py RANK WORLD RENDEZVOUS_FILE OUT_DIR [SCENARIO ...]``

Every rank runs the single-process reference itself (same process, same thread count, so the
comparison is exact where it should be), then the distributed run, and writes
``OUT_DIR/rank{RANK}.json``: scenario -> {"max_abs_diff": ..., ...}. Any failure exits non-zero
with the traceback on stderr.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import helpers  # tests/ is the script's folder, first on sys.path
import htmuon
import htmuon.functional
from htmuon.distributed import ShardLayout, is_dtensor

STEPS = 3

# name -> HTMuon options for the matrix group; every variant runs under DDP and FSDP2
VARIANTS: dict[str, dict] = {
    # method="auto": eigh on a CPU in the tests (conftest sets HTMUON_CPU_BF16=0)
    "default": dict(p=0.125, weight_decay=0.1),
    "ns_interval_normuon": dict(p=0.125, method="ns", interval=2, plugin="normuon"),
    "eigh_muonrms_adamuon": dict(p=0.25, method="eigh", scale="muon_rms", plugin="adamuon", weight_decay=0.1),
    "rank_adamwrms_plain": dict(p=0.5, spectrum="rank", lr_adjust="adamw_rms", nesterov=False),
    # bfloat16 parameters (their decay and step rounded once, whatever the shard)
    "bf16_normuon": dict(p=0.125, plugin="normuon", weight_decay=0.1, dtype=torch.bfloat16),
    # every matrix its own window (the step's memory bound at work), with a second moment to exchange
    "windows_normuon": dict(p=0.125, plugin="normuon", weight_decay=0.1, chunk_bytes=1),
    # float64 directions from float32 matrices: the owner's bits must reach the others (and the plug-in)
    "svd64_normuon": dict(p=0.125, plugin="normuon", compute_dtype=torch.float64),
    # float64 parameters: their shards, second moments and directions travel in float64
    "f64_normuon": dict(p=0.125, plugin="normuon", dtype=torch.float64),
}


#: Settings that are torch.dtype values (what docs/distributed.md advises for nodes of different CPUs)
DTYPE_SETTINGS = dict(
    p=0.125, interval=2, plugin="normuon", ns_dtype=torch.float32, compute_dtype=torch.float64
)


class Batched(nn.Module):
    """A 3-D parameter: a stack of matrices (HTMuon treats it as a batch with batch_3d=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, 6) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,kij->bj", x[:, :4], self.w)[:, :6].sum(-1, keepdim=True) + x[:, :1]


class Net(nn.Module):
    """Uneven shards on 2 ranks: 7 rows (4 + 3), 1 row (1 + 0: an empty shard), a conv kernel, a 3-D stack."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc1 = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 9, bias=False)
        self.conv = nn.Conv2d(1, 5, 3, padding=1)
        self.stack = Batched()
        self.head = nn.Linear(9, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).mean(1)  # (b, 6)
        h = torch.tanh(self.norm(self.fc1(h)))
        h = self.fc2(h)  # (b, 9)
        img = self.conv(h.view(-1, 1, 3, 3)).mean(1).flatten(1)  # (b, 9)
        return self.head(img).squeeze(-1) + self.stack(h).squeeze(-1)


def make_data(step: int, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 11, (batch, 5), generator=g), torch.randn(batch, generator=g)


def loss_fn(model: nn.Module, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (model(tokens) - target).square().mean()


def make_net(options: dict) -> nn.Module:
    return Net().to(options.get("dtype", torch.float32))


def make_opt(model: nn.Module, options: dict, **kw) -> htmuon.HTMuon:
    options = {k: v for k, v in options.items() if k != "dtype"}
    groups = htmuon.param_groups(model, routing="paper", adamw_lr=1e-2, lr=0.02, **options)
    return htmuon.HTMuon(groups, **kw)


def reference(options: dict, steps: int = STEPS) -> tuple[nn.Module, htmuon.HTMuon, list]:
    """Single-process run on the global batch; returns the model, the optimizer and every step's grads."""
    torch.manual_seed(0)
    model = make_net(options)
    opt = make_opt(model, options)
    grads = []
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, *make_data(step)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return model, opt, grads


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if htmuon.distributed.is_dtensor(t) else t


def max_diff(model: nn.Module, ref: nn.Module) -> float:
    ref_params = dict(ref.named_parameters())
    return max(
        (full(p.detach()) - full(ref_params[n].detach())).abs().max().item()
        for n, p in model.named_parameters()
    )


def state_diff(opt: htmuon.HTMuon, model: nn.Module, ref_opt: htmuon.HTMuon, ref: nn.Module) -> float:
    """Max |difference| over every optimizer state tensor (momentum, second moments, AdamW moments)."""
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for n, p in model.named_parameters():
        mine, theirs = opt.state[p], ref_opt.state[ref_params[n]]
        assert mine.keys() == theirs.keys(), (n, mine.keys(), theirs.keys())
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                worst = max(worst, (full(mine[key]) - full(value)).abs().max().item())
            else:
                assert mine[key] == value, (n, key, mine[key], value)
    return worst


def shard_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The DTensor with ``param``'s layout holding ``whole`` (this rank's piece of it, no communication)."""
    from torch.distributed.tensor import DTensor

    mesh = param.device_mesh
    sharded = [k for k, pl in enumerate(param.placements) if hasattr(pl, "dim")]
    k = sharded[0] if sharded else 0
    dim = param.placements[k].dim if sharded else None
    layout = ShardLayout(tuple(whole.shape), dim, mesh.size(k))
    piece = whole[layout.index(mesh.get_coordinate()[k])].contiguous()
    return DTensor.from_local(
        piece, param.device_mesh, param.placements, run_check=False, shape=whole.shape, stride=whole.stride()
    )


def fsdp_model(
    seed: int = 0, options: dict | None = None, mesh_shape: tuple[int, ...] = (), columns: bool = False
) -> nn.Module:
    """fully_shard on the world (FSDP2), or on a (replicate, shard) mesh of ``mesh_shape`` (HSDP);
    ``columns``: every parameter of 2+ dims whose dim 1 divides evenly sharded along it
    (``shard_placement_fn``), not along its rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    torch.manual_seed(seed)
    model = make_net(options or {})
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")) if mesh_shape else None
    # FSDP2 shards dims other than 0 only evenly: fc1 (7, 6) -> 3 + 3 columns, the stack (3, 4, 6) -> 2 + 2
    shards = mesh.size(mesh.ndim - 1) if mesh is not None else dist.get_world_size()
    placement = (
        (lambda p: Shard(1) if p.ndim >= 2 and p.shape[1] % shards == 0 else Shard(0)) if columns else None
    )
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model


# ---------------------------------------------------------------------------------------- scenarios


def register_failing_on_rank1(name: str) -> None:
    """Register backend ``name``: the svd backend, except that it raises on rank 1 (a rank-local failure)."""
    from htmuon.spectral import BACKENDS, register_backend

    rank = dist.get_rank()

    def failing(X, p, spectrum, **_):
        if rank == 1:
            raise RuntimeError("backend failure on rank 1")
        return BACKENDS["svd"].fn(X, p, spectrum)

    register_backend(name, failing, replace=True)


def matrices_stepped(opt) -> int:
    """How many matrices the spectral map had to see over the scenario: each HTMuon matrix once a step."""
    return STEPS * sum(len(g["params"]) for g in opt.param_groups if g["algorithm"] == "htmuon")


class CountComputed:
    """Counts the matrices this rank passes to the spectral map (``htmuon.functional.compute_directions``)
    and the momentum directions it builds (``htmuon.functional.momentum_direction``)."""

    def __init__(self) -> None:
        self.count = 0
        self.momenta = 0
        self._orig = htmuon.functional.compute_directions
        self._orig_momentum = htmuon.functional.momentum_direction

    def __enter__(self) -> CountComputed:
        def counting(mats, corrected, group):
            self.count += len(mats)
            return self._orig(mats, corrected, group)

        def counting_momentum(*args, **kwargs):
            self.momenta += 1
            return self._orig_momentum(*args, **kwargs)

        htmuon.functional.compute_directions = counting
        htmuon.functional.momentum_direction = counting_momentum
        return self

    def __exit__(self, *exc) -> None:
        htmuon.functional.compute_directions = self._orig
        htmuon.functional.momentum_direction = self._orig_momentum


def ddp_exact(options: dict) -> dict:
    """Plain replicated parameters, the same (global-batch) gradients on every rank, work divided."""
    ref, ref_opt, grads = reference(options)
    torch.manual_seed(0)
    model = make_net(options)
    opt = make_opt(model, options, process_group=dist.group.WORLD)
    with CountComputed() as counted:
        for step in range(STEPS):
            for n, p in model.named_parameters():
                p.grad = grads[step][n].clone()
            opt.step()
    stats = opt._dist.stats
    return {
        "max_abs_diff": max_diff(model, ref),
        "state_diff": state_diff(opt, model, ref_opt, ref),
        "bytes_received": stats.bytes_received,
        "bytes_sent": stats.bytes_sent,
        "computed": counted.count,
        "momenta": counted.momenta,
        "matrices": matrices_stepped(opt),
    }


def fsdp_exact(options: dict, mesh_shape: tuple[int, ...] = (), columns: bool = False) -> dict:
    """FSDP2 (DTensor) parameters given the single-process gradients, sharded: must match bit for bit."""
    ref, ref_opt, grads = reference(options)
    model = fsdp_model(0, options, mesh_shape, columns)
    opt = make_opt(model, options)
    with CountComputed() as counted:
        for step in range(STEPS):
            for n, p in model.named_parameters():
                p.grad = shard_like(grads[step][n], p)
            opt.step()
    return {
        "max_abs_diff": max_diff(model, ref),
        "state_diff": state_diff(opt, model, ref_opt, ref),
        "bytes_received": opt._dist.stats.bytes_received,
        "bytes_sent": opt._dist.stats.bytes_sent,
        "collectives": opt._dist.stats.collectives,
        "computed": counted.count,
        "matrices": matrices_stepped(opt),
        "second_moment_placements": {
            n: str(tuple(opt.state[p]["second_moment"].placements))
            for n, p in model.named_parameters()
            if "second_moment" in opt.state[p]
        },
    }


def mismatch() -> dict:
    """Ranks that step different parameters (a count, a shape) or settings (chunk_bytes) under a process
    group: every rank refuses the step with one message (before: gloo aborted the process, or the
    replicas drifted apart silently); nothing changes."""
    rank = dist.get_rank()
    out = {}
    for case in ("count", "shape", "chunk"):
        torch.manual_seed(0)
        shapes = [(5, 6), (4, 6) if case == "shape" and rank == 1 else (4, 5)]
        shapes += [(3, 3)] if case == "count" and rank == 1 else []
        params = [nn.Parameter(torch.randn(*s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        chunk = 1 if case == "chunk" and rank == 1 else htmuon.functional.DEFAULT_CHUNK_BYTES
        opt = htmuon.HTMuon(params, process_group=dist.group.WORLD, chunk_bytes=chunk)
        before = [p.detach().clone() for p in params]
        try:
            opt.step()
            out[case] = "no error"
        except RuntimeError as e:
            out[case] = str(e)
        out[f"{case}_unchanged"] = all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
    return out


def hsdp_refusal() -> dict:
    """HSDP with 2 replicas of 1 shard: a backend failure on one replica's rank only -- both replicas
    refuse the step and change nothing (before: the other replica applied it)."""
    from htmuon.spectral import BACKENDS

    register_failing_on_rank1("test_fail_rank1_hsdp")
    try:
        model = fsdp_model(0, {}, (2, 1))
        opt = make_opt(model, {"method": "test_fail_rank1_hsdp"})
        loss_fn(model, *make_data(0)).backward()
        before = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
        try:
            opt.step()
            error = "no error"
        except RuntimeError as e:
            error = str(e)
        unchanged = all(torch.equal(full(p.detach()), before[n]) for n, p in model.named_parameters())
    finally:
        BACKENDS.pop("test_fail_rank1_hsdp")
    return {"error": error, "unchanged": unchanged and not any(opt.state.values())}


def half_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, target = make_data(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    per = tokens.size(0) // world
    return tokens[rank * per : (rank + 1) * per], target[rank * per : (rank + 1) * per]


def ddp_training(options: dict) -> dict:
    """End to end: DistributedDataParallel, each rank half of the global batch (gradients averaged)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref, _, _ = reference(options)
    models = []
    for process_group in (dist.group.WORLD, None):  # work divided / every rank computing everything
        torch.manual_seed(0)
        model = Net()
        ddp = DDP(model)
        opt = make_opt(model, options, process_group=process_group)
        for step in range(STEPS):
            opt.zero_grad()
            loss_fn(ddp, *half_batch(step)).backward()
            opt.step()
        models.append(model)
    return {"max_abs_diff": max_diff(models[0], ref), "divided_vs_naive": max_diff(models[0], models[1])}


def zero_training(options: dict) -> dict:
    """ZeroRedundancyOptimizer over htmuon.param_groups (docs/integrations.md's recipe) under DDP: each
    rank steps the whole parameters it was given with its own HTMuon, then broadcasts them; equal to the
    single-process optimizer. Its state consolidated on rank 0 loads back."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref, _, _ = reference(options)
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model)
    options = {k: v for k, v in options.items() if k != "dtype"}
    groups = htmuon.param_groups(model, routing="paper", adamw_lr=1e-2, lr=0.02, **options)
    opt = ZeroRedundancyOptimizer(groups, optimizer_class=htmuon.HTMuon)
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(ddp, *half_batch(step)).backward()
        opt.step()
    opt.consolidate_state_dict(to=0)
    loaded = True
    if dist.get_rank() == 0:
        state = opt.state_dict()
        fresh = ZeroRedundancyOptimizer(
            htmuon.param_groups(model, routing="paper", adamw_lr=1e-2, lr=0.02, **options),
            optimizer_class=htmuon.HTMuon,
        )
        fresh.load_state_dict(state)
        # this rank's partition: the same parameters, and every state value equal to the trained one's
        loaded = set(fresh.optim.state) == set(opt.optim.state) and all(
            torch.equal(fresh.optim.state[p][k], v)
            if isinstance(v, torch.Tensor)
            else fresh.optim.state[p][k] == v
            for p, s in opt.optim.state.items()
            for k, v in s.items()
        )
    return {"max_abs_diff": max_diff(model, ref), "loaded": loaded}


def fsdp_training(options: dict) -> dict:
    """End to end: fully_shard, each rank half of the global batch (gradients reduce-scattered); also the
    largest relative difference of a step's gradients to the single-process run's (torch 2.7-2.8's FSDP2
    on gloo summed them over the ranks, where 2.9 averages: a world-size factor that reaches the
    parameters only through the few scale-dependent parts of HTMuon's update)."""
    ref, _, ref_grads = reference(options)
    model = fsdp_model()
    opt = make_opt(model, options)
    grad_diff = 0.0
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(model, *half_batch(step)).backward()
        for n, p in model.named_parameters():
            want = ref_grads[step][n]
            diff = (full(p.grad) - want).abs().max() / want.abs().max().clamp_min(1e-12)
            grad_diff = max(grad_diff, diff.item())
        opt.step()
    return {"max_abs_diff": max_diff(model, ref), "max_rel_grad_diff": grad_diff}


def fsdp_checkpoint(options: dict, directory: str) -> dict:
    """DCP save of model + optimizer under FSDP2 after 3 steps; a fresh model/optimizer loads it and the
    next 3 steps equal the uninterrupted run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def train(model: nn.Module, opt: htmuon.HTMuon, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            loss_fn(model, *half_batch(step)).backward()
            opt.step()

    model = fsdp_model()
    opt = make_opt(model, options)
    train(model, opt, range(3))
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=directory)
    train(model, opt, range(3, 6))

    fresh = fsdp_model(seed=123)
    fresh_opt = make_opt(fresh, options)
    state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    train(fresh, fresh_opt, range(3, 6))
    return {"max_abs_diff": max_diff(fresh, model), "state_diff": state_diff(fresh_opt, fresh, opt, model)}


def parallel_helpers(options: dict, mode: str) -> dict:
    """htmuon.torchrun (what the harness uses under torchrun): wrap, slice the global batch, train;
    full state dicts after 3 steps, reloaded into a fresh wrapped model, continue exactly; the FSDP2
    state dicts also load into a single-process model and optimizer."""
    from htmuon import torchrun

    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    par = torchrun.from_env(mode)
    assert (par.mode, par.world, par.rank) == (mode, dist.get_world_size(), dist.get_rank()), par

    def build(seed: int, p: torchrun.Parallel = par) -> tuple[nn.Module, nn.Module, htmuon.HTMuon]:
        torch.manual_seed(seed)
        model = Net()
        module = torchrun.wrap_model(model, p)
        return model, module, make_opt(model, options, process_group=p.process_group)

    def train(module: nn.Module, opt: htmuon.HTMuon, steps: range, p: torchrun.Parallel = par) -> float:
        for step in steps:
            tokens, target = make_data(step)
            opt.zero_grad()
            loss = loss_fn(module, torchrun.batch_slice(tokens, p), torchrun.batch_slice(target, p))
            loss.backward()
            opt.step()
        return torchrun.mean_across(loss.item(), p)

    ref, _, _ = reference(options)
    model, module, opt = build(0)
    train(module, opt, range(STEPS))
    out = {"max_abs_diff": max_diff(model, ref)}
    model_sd, opt_sd = copy.deepcopy(torchrun.state_dicts(model, opt, par))
    train(module, opt, range(STEPS, STEPS + 2))

    fresh, fresh_module, fresh_opt = build(7)
    torchrun.load_state_dicts(fresh, fresh_opt, model_sd, opt_sd, par)
    train(fresh_module, fresh_opt, range(STEPS, STEPS + 2))
    out["resume_diff"] = max_diff(fresh, model)
    # the logging helpers average over the ranks (ranks 0 and 1 send 1 and 2), and a flag set on one
    # rank only (a signal) is seen by every rank
    out["mean_across"] = torchrun.mean_across(float(par.rank + 1), par)
    out["mean_and_any"] = list(torchrun.mean_and_any(float(par.rank + 1), par.rank == 1, par))
    out["mean_and_none"] = list(torchrun.mean_and_any(0.0, False, par))
    if mode == "ddp":  # Parallel.process_group divides the spectral work among the ranks
        out["divides"] = opt._dist is not None and opt._dist.divides()
    if mode == "fsdp":  # every element of a ModuleList is a unit of its own, then the root
        from torch.distributed.fsdp import FSDPModule

        blocks = nn.Module()
        blocks.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        torchrun.wrap_model(blocks, par)
        out["fsdp_units"] = [isinstance(m, FSDPModule) for m in (*blocks.layers, blocks)]
    if mode == "fsdp":  # the gathered FSDP2 state continues in a single process
        single = torchrun.Parallel()
        alone, alone_module, alone_opt = build(7, single)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        alone.load_state_dict(model_sd)
        set_optimizer_state_dict(alone, alone_opt, opt_sd, options=StateDictOptions(full_state_dict=True))
        train(alone_module, alone_opt, range(STEPS, STEPS + 2), single)
        out["single_resume_diff"] = max_diff(alone, model)
    return out


def bad_inputs() -> dict:
    """Clear errors: a process group that is not the mesh's; a rank outside its process group; a group
    mixing DTensors and plain tensors;
    a non-finite gradient on one rank's shard makes every rank refuse the step (no hang)."""
    out = {}
    model = fsdp_model()
    sub = dist.new_group([0])
    try:
        make_opt(model, {}, process_group=sub if dist.get_rank() == 0 else dist.group.WORLD)
        if dist.get_rank() == 0:
            out["mesh_mismatch"] = "no error"
    except ValueError as e:
        out["mesh_mismatch"] = str(e)
    try:  # rank 1 is not in sub: a plain (DDP-style) optimizer on it is refused, not run as rank -1
        htmuon.HTMuon([nn.Parameter(torch.randn(4, 4))], process_group=sub)
        out["not_member"] = "no error"
    except ValueError as e:
        out["not_member"] = str(e)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh2d = init_device_mesh("cpu", (1, 2))
    tp = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh2d, [Shard(0), Shard(1)]))
    try:
        htmuon.HTMuon([tp])
        out["two_sharded_dims"] = "no error"
    except ValueError as e:
        out["two_sharded_dims"] = str(e)
    plain = nn.Linear(3, 3)
    try:
        htmuon.HTMuon([model.fc1.weight, plain.weight])
        out["mixed"] = "no error"
    except ValueError as e:
        out["mixed"] = str(e)
    opt = make_opt(model, {})
    opt.zero_grad()
    loss_fn(model, *half_batch(0)).backward()
    if dist.get_rank() == 1:
        model.fc1.weight.grad.to_local()[0, 0] = float("nan")
    before = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    try:
        opt.step()
        out["nonfinite"] = "no error"
    except htmuon.NonFiniteGradientError as e:
        out["nonfinite"] = str(e)
    out["nonfinite_unchanged"] = all(
        torch.equal(full(p.detach()), before[n]) for n, p in model.named_parameters()
    ) and not any(opt.state.values())
    # whole tensors (a single-process state dict) loaded into the FSDP2 optimizer: refused at load
    torch.manual_seed(0)
    plain = make_net({})
    plain_opt = make_opt(plain, {})
    loss_fn(plain, *make_data(0)).backward()
    plain_opt.step()
    try:
        opt.load_state_dict(plain_opt.state_dict())
        out["plain_state"] = "no error"
    except ValueError as e:
        out["plain_state"] = str(e)
    return out


def ddp_refusals() -> dict:
    """Under process_group (DDP): a NaN on one rank only, a parameter with a gradient on one rank only,
    a failed check on one rank, a backend failure on one rank -- every rank refuses the same step with
    a clear error and changes nothing (no rank waits in a collective another skipped); afterwards
    good steps still pair their collectives and equal the single-process run, also when a parameter
    has a gradient on no rank (skipped, as in a single process)."""
    from htmuon.spectral import BACKENDS

    rank = dist.get_rank()
    register_failing_on_rank1("test_fail_rank1")
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    opt = make_opt(model, {}, process_group=dist.group.WORLD)
    ref_opt = make_opt(ref, {})

    def backward(step: int) -> None:
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(m, *make_data(step)).backward()

    backward(0)
    opt.step()
    ref_opt.step()
    group = opt.param_groups[0]

    def nan() -> None:
        if rank == 1:
            model.fc1.weight.grad[0, 0] = float("nan")

    def grad_none() -> None:
        if rank == 0:
            model.fc2.weight.grad = None

    def check() -> None:
        if rank == 1:
            group["method"] = "bogus"

    def backend() -> None:
        group["method"] = "test_fail_rank1"

    out: dict = {}
    for name, spoil in (("nonfinite", nan), ("grad_none", grad_none), ("check", check), ("backend", backend)):
        backward(1)
        spoil()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = copy.deepcopy(opt.state_dict()["state"])
        try:
            opt.step()
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the message is the result
            out[name] = f"{type(e).__name__}: {e}"
        group["method"] = "auto"
        after = opt.state_dict()["state"]
        out[f"{name}_unchanged"] = all(
            torch.equal(p, params[n]) for n, p in model.named_parameters()
        ) and all(
            torch.equal(torch.as_tensor(v), torch.as_tensor(after[i][k]))
            for i, s in state.items()
            for k, v in s.items()
        )
    BACKENDS.pop("test_fail_rank1")
    for step in (1, 2):
        backward(step)
        if step == 2:  # no gradient on any rank (a frozen or unused parameter): skipped, as in one process
            model.fc2.weight.grad = ref.fc2.weight.grad = None
        opt.step()
        ref_opt.step()
    out["after_diff"] = max_diff(model, ref)
    out["after_state_diff"] = state_diff(opt, model, ref_opt, ref)
    return out


def replicas_equal(tensors: list[torch.Tensor]) -> bool:
    """Whether every rank holds the same values (plain tensors: DDP replicas)."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def contained(fn, *args) -> dict:
    """``fn(*args)``, or ``{"error": ...}`` where it raises (on every rank alike, as a deterministic
    refusal does, so that the other scenarios still run)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the message is the result
        return {"error": f"{type(e).__name__}: {e}"}


def attempt(fn) -> str:
    try:
        fn()
        return "no error"
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"


def snapshot(model: nn.Module, opt: htmuon.HTMuon) -> tuple[dict, dict]:
    """Every parameter and state tensor (whole, also under FSDP2), to compare after a refused step."""
    params = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    state = {
        (n, k): full(v).clone() if isinstance(v, torch.Tensor) else v
        for n, p in model.named_parameters()
        for k, v in opt.state.get(p, {}).items()
    }
    return params, state


def unchanged(model: nn.Module, opt: htmuon.HTMuon, before: tuple[dict, dict]) -> bool:
    params, state = snapshot(model, opt)

    def same(a, b) -> bool:
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    return all(
        mine.keys() == theirs.keys() and all(same(mine[k], theirs[k]) for k in mine)
        for mine, theirs in ((params, before[0]), (state, before[1]))
    )


def agreement() -> dict:
    """Settings that differ on one rank only (DDP, process_group=WORLD, after a good first step, as a
    scheduler stepped on one rank would leave them; or a node whose CPU resolves method='auto'
    otherwise): every rank refuses the step with one message naming the setting, nothing changes, and
    the next step (the setting made equal again) pairs its collectives. Before: compute_dtype (the
    all_gather's dtype) and ns_dtype / method='auto' (the windows) aborted gloo (SIGABRT), check_finite
    hung the other rank, lr and the others let the replicas drift apart silently, and so did step
    counters that differ (the AdamW part's bias correction, interval's corrected steps)."""
    rank = dist.get_rank()
    out: dict = {}
    cases = {
        "compute_dtype": {"compute_dtype": torch.float64},
        "ns_dtype": {"ns_dtype": torch.float32},  # with method="fast": sizes the windows
        "lr": {"lr": 0.05},
        "lr_tensor": {"lr": torch.tensor(0.05)},
        "p": {"p": 0.5},
        "weight_decay": {"weight_decay": 0.1},
        "adamw_betas": {"adamw_betas": (0.9, 0.99)},  # the AdamW group
        "check_finite": {"check_finite": False},
        "auto_on_another_cpu": {},  # HTMUON_CPU_BF16=1 on rank 1: method='auto' resolves to 'fast'
        "explicit_on_another_cpu": {},  # the same with method='eigh' given: nothing differs, it steps
        "step_counter": {},  # every counter one ahead on rank 1 (another checkpoint loaded there)
    }
    for case, change in cases.items():
        torch.manual_seed(0)
        model = Net()
        base = {
            "ns_dtype": {"method": "fast", "ns_dtype": torch.bfloat16, "chunk_bytes": 2**14},
            "explicit_on_another_cpu": {"method": "eigh"},
            "lr_tensor": {"lr": torch.tensor(0.02)},
        }.get(case, {})
        groups = htmuon.param_groups(model, routing="paper", adamw_lr=1e-2, **{"lr": 0.02, **base})
        opt = htmuon.HTMuon(groups, process_group=dist.group.WORLD)
        loss_fn(model, *make_data(0)).backward()
        opt.step()
        opt.zero_grad()
        loss_fn(model, *make_data(1)).backward()
        if case == "check_finite":  # the same (all-reduced) gradient on both ranks, as DDP gives
            model.fc1.weight.grad[0, 0] = float("nan")
        saved = [dict(g) for g in opt.param_groups]
        env = os.environ.get("HTMUON_CPU_BF16")
        if rank == 1:
            for g in opt.param_groups:
                if case != "adamw_betas" or g["algorithm"] == "adamw":
                    g.update(change)
            if case.endswith("on_another_cpu"):
                os.environ["HTMUON_CPU_BF16"] = "1"
            if case == "step_counter":
                for st in opt.state.values():
                    st["step"] += 1
        before = snapshot(model, opt)
        out[case] = attempt(opt.step)
        out[f"{case}_unchanged"] = unchanged(model, opt, before)
        if env is not None:
            os.environ["HTMUON_CPU_BF16"] = env
        for g, s in zip(opt.param_groups, saved):
            g.update({k: v for k, v in s.items() if k != "params"})
        if case == "check_finite":
            model.fc1.weight.grad[0, 0] = 0.0
        if case == "step_counter" and rank == 1:
            for st in opt.state.values():
                st["step"] -= 1
        out[f"{case}_after"] = attempt(opt.step)
        out[f"{case}_replicas_equal"] = replicas_equal(list(model.parameters()))
    # FSDP2: an lr on one rank updated the rows of that rank's shard with it
    model = fsdp_model()
    opt = make_opt(model, {})
    loss_fn(model, *half_batch(0)).backward()
    if rank == 1:
        opt.param_groups[0]["lr"] = 0.05
    before = snapshot(model, opt)
    out["fsdp_lr"] = attempt(opt.step)
    out["fsdp_lr_unchanged"] = unchanged(model, opt, before)
    return out


def finite_blind() -> dict:
    """check_finite=False on rank 1 with a NaN gradient, the checksum made blind to check_finite (the
    refusal must come from the all-reduced flags alone, the same on every rank): both ranks refuse.
    Before: rank 0 refused, rank 1 entered the all_gather and waited for the timeout."""
    from htmuon import distributed as D

    rank = dist.get_rank()
    settings = getattr(D, "SIGNATURE_SETTINGS", None)
    parts = D.SIGNATURE_PARTS
    if settings is not None:
        D.SIGNATURE_SETTINGS = tuple(k for k in settings if k != "check_finite")
        D.SIGNATURE_PARTS = tuple(k for k in parts if k != "check_finite")
    try:
        torch.manual_seed(0)
        model = Net()
        opt = make_opt(model, {"check_finite": rank == 0}, process_group=dist.group.WORLD)
        loss_fn(model, *make_data(0)).backward()
        model.fc1.weight.grad[0, 0] = float("nan")
        before = snapshot(model, opt)
        out = {"error": attempt(opt.step), "unchanged": unchanged(model, opt, before)}
    finally:
        if settings is not None:
            D.SIGNATURE_SETTINGS, D.SIGNATURE_PARTS = settings, parts
    # check_finite=False on every rank: the NaN step is taken, as in a single process (the agreed
    # flags check only the groups that ask for it)
    torch.manual_seed(0)
    model = Net()
    # (HTMuon's own routing gives the option to both groups; htmuon.param_groups to the matrices only)
    opt = htmuon.HTMuon(model.named_parameters(), check_finite=False, process_group=dist.group.WORLD)
    loss_fn(model, *make_data(0)).backward()
    model.norm.weight.grad[0] = float("nan")  # an AdamW parameter, on every rank (as DDP averages it)
    out["unchecked"] = attempt(opt.step)
    out["unchecked_nan"] = bool(model.norm.weight.isnan().any())
    return out


def failing_on_rank1(module, name: str, calls: int = 1):
    """Make ``module.name`` raise a simulated out-of-memory error on rank 1 (its first ``calls`` calls);
    returns a function restoring it."""
    import inspect

    real = getattr(module, name)
    static = inspect.getattr_static(module, name)
    left = [calls]

    def failing(*args, **kwargs):
        if dist.get_rank() == 1 and left[0] > 0:
            left[0] -= 1
            raise torch.OutOfMemoryError(f"simulated: out of memory in {name} on rank 1")
        return real(*args, **kwargs)

    setattr(module, name, staticmethod(failing) if isinstance(static, staticmethod) else failing)
    return lambda: setattr(module, name, static)


def failures() -> dict:
    """A failure on rank 1 only (a simulated out-of-memory error) outside the spectral map, after the
    step's agreement: building N_t (DDP, FSDP2), preparing the parameters or assembling the whole
    matrices (FSDP2): every rank refuses the step together, nothing changes, and the next step pairs
    its collectives. Before: rank 1 raised and rank 0 waited in the next collective for the timeout."""
    from htmuon.distributed import DistributedStep

    out: dict = {}
    F = htmuon.functional
    cases = {
        "ddp_momentum": (False, lambda: failing_on_rank1(F, "momentum_direction")),
        "fsdp_momentum": (True, lambda: failing_on_rank1(F, "momentum_direction")),
        "fsdp_prepare": (True, lambda: failing_on_rank1(DistributedStep, "_prepare")),
        "fsdp_assemble": (True, lambda: failing_on_rank1(F, "matrix_view")),
    }
    for case, (sharded, arm) in cases.items():
        torch.manual_seed(0)
        model = fsdp_model() if sharded else Net()
        opt = make_opt(model, {}, **({} if sharded else {"process_group": dist.group.WORLD}))
        loss_fn(model, *(half_batch(0) if sharded else make_data(0))).backward()
        before = snapshot(model, opt)
        restore = arm()
        try:
            out[case] = attempt(opt.step)
        finally:
            restore()
        out[f"{case}_unchanged"] = unchanged(model, opt, before)
        out[f"{case}_after"] = attempt(opt.step)
        if not sharded:
            out[f"{case}_replicas_equal"] = replicas_equal(list(model.parameters()))
    return out


def late_failures() -> dict:
    """Failures on rank 1 after an exchange, so that rank 0 goes on.

    ``plugin``: DDP, NorMuon, one matrix per rank and window (chunk_bytes=1); the plug-in of the first
    window fails on rank 1 (after the window's all_gather): rank 1 tells the others at the second
    window's exchange, and both raise (rank 0 saying how many parameters it had updated). Before:
    rank 1 raised, rank 0 waited in the second window's all_gather for the timeout.

    ``adamw``: the AdamW part (after the step's last exchange) fails on rank 1: rank 0 completes the
    step, rank 1 raises. Before: the next steps ran on from different replicas, silently.

    Either way the replicas may differ afterwards: the next step is refused on both ranks, until both
    load a checkpoint; then the steps go on, the replicas equal."""
    out: dict = {}
    F = htmuon.functional
    for case, options, name in (
        ("plugin", {"plugin": "normuon", "chunk_bytes": 1}, "second_moment_normalize"),
        ("adamw", {}, "adamw"),
    ):
        torch.manual_seed(0)
        model = Net()
        opt = make_opt(model, options, process_group=dist.group.WORLD)
        loss_fn(model, *make_data(0)).backward()
        opt.step()
        checkpoint = copy.deepcopy((model.state_dict(), opt.state_dict()))
        opt.zero_grad()
        loss_fn(model, *make_data(1)).backward()
        restore = failing_on_rank1(F, name)
        try:
            out[case] = attempt(opt.step)
        finally:
            restore()
        out[f"{case}_next"] = attempt(opt.step)
        model.load_state_dict(checkpoint[0])
        opt.load_state_dict(checkpoint[1])
        out[f"{case}_after_load"] = attempt(opt.step)
        out[f"{case}_replicas_equal"] = replicas_equal(list(model.parameters()))
    return out


def loading() -> dict:
    """load_state_dict where one rank's part of the state dict is refused (a NaN in rank 1's shard of
    an FSDP2 momentum, loaded with set_optimizer_state_dict; a NaN in rank 1's copy under DDP): every
    rank refuses and none changes anything (another parameter's state, changed in the dict on every
    rank, is not loaded either), and a good state dict then loads on both. Before: rank 1 refused,
    rank 0 loaded."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    rank = dist.get_rank()
    out: dict = {}
    model = fsdp_model()
    opt = make_opt(model, {})
    loss_fn(model, *half_batch(0)).backward()
    opt.step()

    def spoiled() -> dict:
        sd = get_optimizer_state_dict(model, opt)
        sd = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
        fc1, fc2 = sd["state"]["fc1.weight"], sd["state"]["fc2.weight"]
        fc1["momentum_buffer"] = buf = fc1["momentum_buffer"].clone()
        fc2["momentum_buffer"] = fc2["momentum_buffer"] * 2
        if rank == 1:
            buf.to_local()[0, 0] = float("nan")
        return sd

    before = snapshot(model, opt)
    out["fsdp"] = attempt(lambda: set_optimizer_state_dict(model, opt, spoiled()))
    out["fsdp_unchanged"] = unchanged(model, opt, before)
    good = get_optimizer_state_dict(model, opt)
    good = {"state": {k: dict(v) for k, v in good["state"].items()}, "param_groups": good["param_groups"]}
    out["fsdp_good"] = attempt(lambda: set_optimizer_state_dict(model, opt, good))

    # state laid out otherwise than the parameters (a column-sharded model's state dict in a row-sharded
    # one; a NorMuon moment replicated where the step shards it with the rows): refused when loaded,
    # naming the state (before: loaded, and the next step failed with a bare size mismatch)
    from torch.distributed.tensor import Replicate

    for case, options in (("fsdp_layout", {}), ("fsdp_moment_layout", {"plugin": "normuon"})):
        model = fsdp_model(0, options)
        opt = make_opt(model, options)
        loss_fn(model, *half_batch(0)).backward()
        opt.step()
        if case == "fsdp_layout":
            other = fsdp_model(0, options, columns=True)
            other_opt = make_opt(other, options)
            loss_fn(other, *half_batch(0)).backward()
            other_opt.step()
            sd = other_opt.state_dict()
        else:
            sd = opt.state_dict()
            sd = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
            names = {p: n for n, p in model.named_parameters()}
            ids = {
                names[p]: i
                for g, sg in zip(opt.param_groups, sd["param_groups"])
                for p, i in zip(g["params"], sg["params"])
            }
            fc1 = sd["state"][ids["fc1.weight"]]  # its moment is sharded with its rows
            fc1["second_moment"] = fc1["second_moment"].redistribute(placements=[Replicate()])
        before = snapshot(model, opt)
        placements = [str(v.placements) for s in opt.state.values() for v in s.values() if is_dtensor(v)]
        out[case] = attempt(lambda opt=opt, sd=sd: opt.load_state_dict(sd))
        out[f"{case}_unchanged"] = unchanged(model, opt, before) and placements == [
            str(v.placements) for s in opt.state.values() for v in s.values() if is_dtensor(v)
        ]
        opt.zero_grad()
        loss_fn(model, *half_batch(1)).backward()
        out[f"{case}_next"] = attempt(opt.step)

    torch.manual_seed(0)
    model = Net()
    opt = make_opt(model, {}, process_group=dist.group.WORLD)
    loss_fn(model, *make_data(0)).backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        if "momentum_buffer" in state:
            state["momentum_buffer"].mul_(2)
    if rank == 1:
        first = next(s for s in sd["state"].values() if "momentum_buffer" in s)
        first["momentum_buffer"][0, 0] = float("nan")
    before = snapshot(model, opt)
    out["ddp"] = attempt(lambda: opt.load_state_dict(sd))
    out["ddp_unchanged"] = unchanged(model, opt, before)
    out["ddp_good"] = attempt(lambda: opt.load_state_dict(copy.deepcopy(opt.state_dict())))
    return out


def reshard(phase: str) -> dict:
    """torch.distributed.checkpoint across world sizes: ``save`` (2 processes) trains 3 steps under
    FSDP2 and saves model and optimizer; ``load`` (3 processes) loads them into a fresh model and
    optimizer and takes 3 more steps. Given the single-process gradients, the resumed run equals the
    uninterrupted single-process run exactly. Column shards where they divide evenly, so the stack's
    placement changes with the world size (Shard(1) on 2 ranks, Shard(0) on 3), and NorMuon's
    moments, interval 2."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = VARIANTS["ns_interval_normuon"]
    directory = os.environ["HTMUON_TEST_RESHARD_DIR"]
    ref, ref_opt, grads = reference(options, steps=2 * STEPS)
    model = fsdp_model(0 if phase == "save" else 123, options, columns=True)
    opt = make_opt(model, options)
    if phase == "load":
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=directory)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
    for step in range(STEPS) if phase == "save" else range(STEPS, 2 * STEPS):
        for n, p in model.named_parameters():
            p.grad = shard_like(grads[step][n], p)
        opt.step()
    if phase == "save":
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
            checkpoint_id=directory,
        )
        return {}
    return {"max_abs_diff": max_diff(model, ref), "state_diff": state_diff(opt, model, ref_opt, ref)}


#: FSDP2 trains right on CPUs (gloo) from torch 2.9 (helpers.HAS_FSDP2, torchrun.FSDP_CPU_TORCH);
#: without it only the scenarios that use no FSDP2 and no DTensor run, the others recorded as skipped.
FSDP_FREE = (
    "ddp_exact/",
    "ddp_training",
    "zero_training",
    "parallel_ddp",
    "ddp_refusals",
    "mismatch",
    "finite_blind",
    "late_failures",
)
SKIPPED = "skipped: FSDP2 (fully_shard) trains right on CPUs from torch 2.9"

#: Scenarios run only when named (tests/test_distributed.py runs them in a launch of their own, with a
#: short process-group timeout: where they would hang or abort, the other scenarios' results stay).
ON_REQUEST = (
    "agreement",
    "finite_blind",
    "failures",
    "late_failures",
    "loading",
    "reshard_save",
    "reshard_load",
)


def jobs_table(out_dir: str) -> dict:
    """Every scenario, by name: (function, options)."""
    jobs = {}
    for name, options in VARIANTS.items():
        jobs[f"ddp_exact/{name}"] = (ddp_exact, options)
        jobs[f"fsdp_exact/{name}"] = (fsdp_exact, options)
    for shape in ((1, 2), (2, 1)):  # HSDP: 1 replica of 2 shards, 2 replicas of 1 shard
        jobs[f"hsdp_exact/{shape[0]}x{shape[1]}"] = (
            lambda o, shape=shape: fsdp_exact(o, shape),
            VARIANTS["ns_interval_normuon"],
        )
    for name in ("ns_interval_normuon", "eigh_muonrms_adamuon"):  # Shard(1): columns split
        jobs[f"fsdp_columns/{name}"] = (lambda o: fsdp_exact(o, columns=True), VARIANTS[name])
    jobs["ddp_training"] = (ddp_training, VARIANTS["default"])
    jobs["fsdp_training"] = (fsdp_training, VARIANTS["ns_interval_normuon"])
    jobs["zero_training"] = (zero_training, VARIANTS["default"])
    ckpt_dir = os.path.join(out_dir, "dcp")
    jobs["fsdp_checkpoint"] = (lambda o: fsdp_checkpoint(o, ckpt_dir), VARIANTS["ns_interval_normuon"])
    jobs["parallel_ddp"] = (lambda o: parallel_helpers(o, "ddp"), VARIANTS["ns_interval_normuon"])
    jobs["parallel_fsdp"] = (lambda o: parallel_helpers(o, "fsdp"), VARIANTS["ns_interval_normuon"])
    # dtype settings in the param groups: torch's full state dicts refuse a torch.dtype value
    # (an error there, the same on every rank, fails this job's test alone)
    jobs["parallel_fsdp_dtypes"] = (lambda o: contained(parallel_helpers, o, "fsdp"), DTYPE_SETTINGS)
    jobs["bad_inputs"] = (lambda o: bad_inputs(), {})
    jobs["ddp_refusals"] = (lambda o: ddp_refusals(), {})
    jobs["mismatch"] = (lambda o: mismatch(), {})
    jobs["hsdp_refusal"] = (lambda o: hsdp_refusal(), {})
    for name in ON_REQUEST:
        if name.startswith("reshard_"):
            jobs[name] = (lambda o, name=name: reshard(name.removeprefix("reshard_")), {})
        else:
            jobs[name] = (lambda o, name=name: globals()[name](), {})
    return jobs


def main() -> int:
    rank, world, rendezvous, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    wanted = sys.argv[5:]
    torch.set_num_threads(1)
    jobs = {
        name: job
        for name, job in jobs_table(out_dir).items()
        if (any(name.startswith(w) for w in wanted) if wanted else name not in ON_REQUEST)
    }
    results: dict[str, dict] = {}
    if not helpers.HAS_FSDP2:
        results = {name: SKIPPED for name in jobs if not name.startswith(FSDP_FREE)}
    if len(results) == len(jobs):  # nothing to run: no process group (torch 2.5 saw a rank that connected
        # and left at once close its sockets while its peer was still connecting: "Connection closed by peer")
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        return 0
    timeout = float(os.environ.get("HTMUON_TEST_DIST_TIMEOUT", "1800"))
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        for name, (fn, options) in jobs.items():
            if name in results:
                continue
            results[name] = fn(copy.deepcopy(options))
            dist.barrier()
    except Exception:
        traceback.print_exc()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        return 1
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without the interpreter's finalization: there, gloo's worker threads can still hold
    # tensors whose release needs the GIL, and the process aborts ("terminate called without an active
    # exception", SIGABRT; seen once in session 30's CI on rank 1, after rank 0 had finished every job;
    # pytorch/pytorch PR 179291 describes the mechanism). The results are written and closed above.
    os._exit(code)
