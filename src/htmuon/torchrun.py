"""Data-parallel training under ``torchrun``: the few pieces a training loop needs (DDP or FSDP2).

(The sharded optimizer step these runs use is :mod:`htmuon.distributed`; this module launches and
wires the processes around it.)

    par = torchrun.from_env("auto", device)             # reads torchrun's RANK / WORLD_SIZE
    module = torchrun.wrap_model(model, par, device)     # DDP(model) / fully_shard(model) / model
    opt = htmuon.HTMuon(groups, process_group=par.process_group)   # DDP: divide the spectral work
    x = torchrun.batch_slice(x, par)                     # this rank's rows of the global batch
    loss = torchrun.mean_across(float(loss), par)        # for logging
    loss, stop = torchrun.mean_and_any(float(loss), stop, par)   # ... and a stop all ranks agree on
    model_sd, opt_sd = torchrun.state_dicts(model, opt, par)     # full tensors (checkpoint on rank 0)
    torchrun.load_state_dicts(model, opt, model_sd, opt_sd, par)

Every rank draws the same global batch and trains on its slice of the rows, so a run on N processes
sees the data a single process sees (global batch = union of the ranks' slices); only float
rounding of the gradient average differs. Without ``torchrun`` (no ``RANK`` in the environment)
everything is a no-op and the loop is the single-process loop.

A hung or dead rank ends the job: every collective waits at most the process group's timeout
(``timeout_s``; default :data:`DEFAULT_TIMEOUT_S`, or the ``HTMUON_DIST_TIMEOUT`` environment
variable, in seconds), and :func:`collective_errors` turns the failure into a one-line
:class:`~htmuon.errors.CollectiveError` on every surviving rank. With gloo (CPU) the timeout fires
in the waiting collective itself (a dead peer fails it at once: connection reset); with NCCL,
torch's watchdog aborts the communicator after it (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from htmuon.errors import CollectiveError, UserError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PARALLEL_MODES",
    "TIMEOUT_ENV",
    "Parallel",
    "barrier",
    "batch_slice",
    "check_same",
    "collective_errors",
    "collective_timeout",
    "from_env",
    "list_elements_innermost_first",
    "load_state_dicts",
    "main_first",
    "mean_across",
    "mean_and_any",
    "state_dicts",
    "wrap_model",
]

#: "auto": DDP under torchrun with more than one process, else single-process; "none": never
#: wrap; "ddp": DistributedDataParallel; "fsdp": FSDP2 (fully_shard, DTensor parameters).
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
#: Seconds a collective waits for the other ranks before the job fails (torch's own default for
#: gloo is 30 min; 10 min still covers a slow checkpoint write or evaluation on rank 0).
DEFAULT_TIMEOUT_S = 600.0
#: Environment variable overriding :data:`DEFAULT_TIMEOUT_S` (seconds, > 0).
TIMEOUT_ENV = "HTMUON_DIST_TIMEOUT"


@dataclass(frozen=True)
class Parallel:
    """Where this process stands: the mode actually used and its rank among ``world`` processes."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

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


def collective_timeout(timeout_s: float | None = None) -> float:
    """``timeout_s`` if given, else ``$HTMUON_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`; a
    ValueError naming the value unless it is a finite number of seconds > 0."""
    where = "timeout_s"
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_S
        where = TIMEOUT_ENV
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}") from None
    if not (0 < timeout_s < float("inf")):
        raise ValueError(f"{where} must be a number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


def from_env(
    mode: str = "auto", device: torch.device | str = "cpu", timeout_s: float | None = None
) -> Parallel:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``).

    gloo on CPU, NCCL on CUDA (each process then uses GPU ``LOCAL_RANK``). Without torchrun, only
    ``mode`` "auto" or "none" is valid and nothing is initialised. ``timeout_s``: how long a
    collective (and the group's start) waits for the other ranks (:func:`collective_timeout`).

    Raises:
        ValueError: a bad mode or timeout, or a parallel mode without torchrun.
        CollectiveError: the other ranks did not join within the timeout.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"Invalid parallel mode: {mode!r}; valid: {PARALLEL_MODES}")
    timeout_s = collective_timeout(timeout_s)
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
    par = Parallel("ddp" if mode == "auto" else mode, rank, world, local_rank, timeout_s)
    if not dist.is_initialized():
        with collective_errors(par, "the process group did not form"):
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
            )
    return par


#: Failures of a collective as gloo / NCCL / the TCP store report them (torch raises RuntimeError or a
#: subclass, torch.distributed.DistError, whose text names the cause).
_COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|timed out|timeout|connection (reset|closed|refused)|broken pipe|socket|peer", re.IGNORECASE
)


_RANK_PREFIX = re.compile(r"rank \d+ of \d+: ")


@contextmanager
def collective_errors(par: Parallel, what: str = "a collective failed") -> Iterator[None]:
    """Under torchrun, turn a failed collective into a one-line :class:`CollectiveError` on this rank.

    A rank that hangs (stopped, deadlocked) makes the others' next collective fail after
    ``par.timeout_s``; a rank that dies fails it at once. Of two processes the message names the
    other one (gloo and NCCL do not say which peer failed). A :class:`~htmuon.errors.UserError`
    raised on some ranks only (a data file one of them cannot read) gets ``rank R of N:`` in front.
    Everything else passes through unchanged, as does everything in a single process.
    """
    try:
        yield
    except UserError as e:
        if par.world > 1 and len(e.args) == 1 and not _RANK_PREFIX.match(str(e.args[0])):
            e.args = (f"rank {par.rank} of {par.world}: {e.args[0]}",)
        raise
    except RuntimeError as e:
        import torch.distributed as dist

        dist_error = getattr(dist, "DistError", ())
        if par.world == 1 or not (isinstance(e, dist_error) or _COLLECTIVE_FAILURE.search(str(e))):
            raise
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
        detail = detail.split(" This is typically caused by")[0]  # gloo's advice, not the cause
        # gloo / NCCL do not say which peer failed; of two processes it can only be the other one
        peer = f"rank {1 - par.rank}" if par.world == 2 else "another rank"
        raise CollectiveError(
            f"rank {par.rank} of {par.world}: {what}: {peer} hung or died (waited up to "
            f"{par.timeout_s:g} s; set {TIMEOUT_ENV} to change it): {detail[:200]}"
        ) from None


def check_same(
    values: dict,
    par: Parallel,
    what: str = "settings",
    hint: str = "start every rank with the same flags, config file and data",
) -> None:
    """Refuse, on every rank, unless every rank passes equal ``values`` (a collective: every rank calls
    it; a dict of picklable values, e.g. the run's config).

    Ranks started with different flags, config files or data would otherwise train silently on
    different batches (``seed``, ``batch_size``), or leave a collective unmatched, which ends the job
    after the collective timeout as if a rank had hung (``ckpt_every``, ``eval_every``, ``steps``).

    Raises:
        UserError: one line naming the first rank that differs from rank 0, the keys it differs in with
            their values, and the other ranks that differ.
    """
    if par.world == 1:
        return
    import torch.distributed as dist

    gathered: list[Any] = [None] * par.world
    dist.all_gather_object(gathered, values)
    first, missing = gathered[0], "(not set)"
    ranks = [r for r, v in enumerate(gathered) if v != first]
    if not ranks:
        return
    other = gathered[ranks[0]]
    keys = [k for k in dict.fromkeys([*first, *other]) if first.get(k, missing) != other.get(k, missing)]
    shown = ", ".join(f"{k} ({first.get(k, missing)!r} vs {other.get(k, missing)!r})" for k in keys[:4])
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    # the keys shown are the first differing rank's (another may differ in other keys): the rest are named
    others = f"; rank(s) {', '.join(map(str, ranks[1:]))} differ from rank 0 too" if len(ranks) > 1 else ""
    raise UserError(
        f"rank {par.rank} of {par.world}: the ranks run with different {what}: rank {ranks[0]} "
        f"differs from rank 0 in {shown}{more}{others}; {hint}"
    )


def list_elements_innermost_first(model: nn.Module) -> list[nn.Module]:
    """The elements of every ``nn.ModuleList`` in ``model``, each once, those of a list nested inside
    an element (a block's experts) before that element (children before parents: FSDP2's order)."""
    out: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            visit(child)
        if isinstance(module, nn.ModuleList):
            for element in module:
                if id(element) not in seen:
                    seen.add(id(element))
                    out.append(element)

    visit(model)
    return out


#: The oldest torch whose FSDP2 trains right on CPUs (gloo). Measured (2 processes, one Linear layer, each
#: on half the batch): torch 2.6.0's ``fully_shard`` fails at the first forward ("'Stream' object has no
#: attribute 'record_event'"); 2.7.1's and 2.8.0's gradients are the sum over the processes, twice the
#: single-process gradient (2.7.1's HSDP also fails: "Cannot use ReduceOp.AVG with Gloo"); 2.9.1's and
#: 2.13's are the single-process gradient.
FSDP_CPU_TORCH = (2, 9)


def fsdp_refusal(torch_version: str, device_type: str, public_fully_shard: bool) -> str | None:
    """Why ``parallel='fsdp'`` cannot run with this torch (``torch.__version__``) on this device type, or
    None where it can: FSDP2's ``fully_shard`` is public from torch 2.6 (torch 2.4's private one needs
    CUDA), and trains right on CPUs from torch 2.9 (:data:`FSDP_CPU_TORCH`)."""
    way_out = "use parallel='ddp', or upgrade torch"
    if not public_fully_shard:
        return (
            f"parallel='fsdp' needs torch >= 2.6, where FSDP2's fully_shard is public (this is torch "
            f"{torch_version}); {way_out}"
        )
    release = tuple(int(x) for x in re.findall(r"\d+", torch_version.split("+")[0])[:2])
    if device_type == "cpu" and release < FSDP_CPU_TORCH:
        return (
            f"parallel='fsdp' on CPUs needs torch >= {FSDP_CPU_TORCH[0]}.{FSDP_CPU_TORCH[1]} (torch "
            f"{torch_version}'s FSDP2 fails on CPUs, or sums the gradients over the processes instead of "
            f"averaging them); {way_out}"
        )
    return None


def wrap_model(model: nn.Module, par: Parallel, device: torch.device | str | None = None) -> nn.Module:
    """The module to run forward/backward through.

    ddp: ``DistributedDataParallel(model)``; fsdp: ``fully_shard`` on every element of every
    ``nn.ModuleList`` (the transformer blocks / stages; nested lists such as a block's experts
    innermost first, as FSDP2 needs), then on the root -- in place, so ``model``'s parameters become
    DTensors (build the optimizer afterwards); none: ``model`` itself.
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
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6: FSDP2 was private (and CUDA-only on torch 2.4)
            fully_shard = None
        if device is not None:
            device_type = torch.device(device).type
        else:  # where fully_shard puts its default mesh
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        refusal = fsdp_refusal(torch.__version__, device_type, fully_shard is not None)
        if refusal is not None:
            raise UserError(refusal)
        for block in list_elements_innermost_first(model):
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


def mean_and_any(value: float, flag: bool, par: Parallel) -> tuple[float, bool]:
    """The mean of a Python number over the ranks and whether any rank's flag is set, in one
    collective (every rank calls it). The training loop sends its loss and "a stop was requested"
    (a signal, which may reach only some ranks), so that every rank stops after the same step."""
    if par.world == 1:
        return value, bool(flag)
    import torch.distributed as dist

    t = torch.tensor([float(value), float(bool(flag))], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    total, votes = t.tolist()
    return total / par.world, votes > 0


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


def finish() -> int:
    """End a torchrun job: a barrier (no rank tears gloo down while a peer still has collectives in
    flight), then destroy the process group. Returns this process's rank (0 without torchrun).

    Raises:
        CollectiveError: another rank hung or died before reaching the barrier.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    rank, world = dist.get_rank(), dist.get_world_size()
    with collective_errors(Parallel("ddp", rank, world, timeout_s=collective_timeout())):
        dist.barrier()
    dist.destroy_process_group()
    return rank
