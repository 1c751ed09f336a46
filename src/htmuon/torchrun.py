"""Data-parallel training under ``torchrun``: the few pieces a training loop needs (DDP or FSDP2).

(The sharded optimizer step these runs use is :mod:`htmuon.distributed`; this module launches and
wires the processes around it.)

    par = torchrun.from_env("auto", device)             # reads torchrun's RANK / WORLD_SIZE
    module = torchrun.wrap_model(model, par, device)     # DDP(model) / fully_shard(model) / model
    opt = htmuon.HTMuon(groups, process_group=par.process_group)   # DDP: divide the spectral work
    x = torchrun.batch_slice(x, par)                     # this rank's rows of the global batch
    loss = torchrun.mean_across(float(loss), par)        # for logging
    model_sd, opt_sd = torchrun.state_dicts(model, opt, par)     # full tensors (checkpoint on rank 0)
    torchrun.load_state_dicts(model, opt, model_sd, opt_sd, par)

Every rank draws the same global batch and trains on its slice of the rows, so a run on N processes
sees the data a single process sees (global batch = union of the ranks' slices); only float
rounding of the gradient average differs. Without ``torchrun`` (no ``RANK`` in the environment)
everything is a no-op and the loop is the single-process loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PARALLEL_MODES",
    "Parallel",
    "barrier",
    "batch_slice",
    "from_env",
    "load_state_dicts",
    "main_first",
    "mean_across",
    "state_dicts",
    "wrap_model",
]

#: "auto": DDP under torchrun with more than one process, else single-process; "none": never
#: wrap; "ddp": DistributedDataParallel; "fsdp": FSDP2 (fully_shard, DTensor parameters).
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class Parallel:
    """Where this process stands: the mode actually used and its rank among ``world`` processes."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def process_group(self) -> Any:
        """``HTMuon(process_group=...)``: the world group under DDP (divide the spectral work), else None
        (FSDP2's DTensor parameters bring their own mesh)."""
        if self.mode != "ddp":
            return None
        import torch.distributed as dist

        return dist.group.WORLD


def from_env(mode: str = "auto", device: torch.device | str = "cpu") -> Parallel:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``).

    gloo on CPU, NCCL on CUDA (each process then uses GPU ``LOCAL_RANK``). Without torchrun, only
    ``mode`` "auto" or "none" is valid and nothing is initialised.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"Invalid parallel mode: {mode!r}; valid: {PARALLEL_MODES}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if mode in ("ddp", "fsdp"):
            raise ValueError(
                f"parallel={mode!r} needs a torchrun launch (e.g. torchrun --nproc_per_node=2 ...); "
                "RANK / WORLD_SIZE are not set"
            )
        return Parallel()
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if mode == "none" or (mode == "auto" and world == 1):
        if world > 1:
            raise ValueError(f"parallel='none' but torchrun started {world} processes")
        return Parallel()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Parallel("ddp" if mode == "auto" else mode, rank, world, local_rank)


def wrap_model(model: nn.Module, par: Parallel, device: torch.device | str | None = None) -> nn.Module:
    """The module to run forward/backward through.

    ddp: ``DistributedDataParallel(model)``; fsdp: ``fully_shard`` on every element of every
    ``nn.ModuleList`` (the transformer blocks / stages), then on the root -- in place, so ``model``'s
    parameters become DTensors (build the optimizer afterwards); none: ``model`` itself.
    """
    if par.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = torch.device(device) if device is not None else None
        ids = (
            [device.index if device.index is not None else par.local_rank]
            if device and device.type == "cuda"
            else None
        )
        return DistributedDataParallel(model, device_ids=ids)
    if par.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
    return model


def batch_slice(x: Tensor, par: Parallel) -> Tensor:
    """This rank's rows of a global batch (dim 0), which must divide evenly among the ranks."""
    if par.world == 1:
        return x
    n = x.size(0)
    if n % par.world:
        raise ValueError(f"global batch of {n} rows does not divide among {par.world} processes")
    per = n // par.world
    return x[par.rank * per : (par.rank + 1) * per]


def mean_across(value: float, par: Parallel) -> float:
    """The mean of a Python number over the ranks (a collective: every rank calls it)."""
    if par.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / par.world


def state_dicts(model: nn.Module, opt: torch.optim.Optimizer, par: Parallel) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with whole tensors, for a checkpoint that rank 0 writes.

    Under FSDP2 the shards are gathered (a collective: every rank calls it); the optimizer state is
    then keyed by parameter name (``torch.distributed.checkpoint.state_dict`` format). Otherwise the
    plain ``state_dict()``s (under DDP every rank holds the complete state).
    """
    if par.mode != "fsdp":
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def load_state_dicts(
    model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, opt_sd: dict, par: Parallel
) -> None:
    """Inverse of :func:`state_dicts` (every rank passes the whole dicts, e.g. each loads the file)."""
    if par.mode != "fsdp":
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)  # (these replace the dicts' values: pass copies)
    set_model_state_dict(model, _copy_containers(model_sd), options=options)
    set_optimizer_state_dict(model, opt, _copy_containers(opt_sd), options=options)


def _copy_containers(obj: Any) -> Any:
    """A copy of nested dicts / lists / tuples sharing the leaves (tensors are not copied)."""
    if isinstance(obj, dict):
        return {k: _copy_containers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_containers(v) for v in obj)
    return obj


def barrier(par: Parallel) -> None:
    """Wait for every rank (no-op in a single process)."""
    if par.world > 1:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def main_first(par: Parallel) -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (e.g. filling a cache they then read)."""
    if not par.is_main:
        barrier(par)
    try:
        yield
    finally:
        if par.is_main:
            barrier(par)
