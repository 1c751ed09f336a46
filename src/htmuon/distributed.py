"""The distributed HTMuon step: DDP (replicated parameters) and FSDP2 (DTensor parameters).

The spectral map is the expensive part of an HTMuon step; everything else (momentum, the NorMuon
plug-in, the shape scaling, weight decay, the AdamW part) is element- or row-wise and cheap. So the
distributed step is the single-process step plus explicit communication around the spectral map:

* **Owners.** Every matrix of a param group gets one owner rank, chosen from the shapes alone (so
  every rank computes the same table without talking): greedy longest-processing-time on the
  estimated cost ``B m n min(m, n)`` (:func:`assign_owners`), once per step; each rank's matrices
  are then cut into memory-bounded windows, window ``k`` of the step holding every rank's ``k``-th
  (:func:`plan_owned_windows`), so every rank computes in every window. Each rank runs the spectral
  map only for the matrices it owns -- batched by shape exactly as in a single process.
* **DDP** (plain tensors, identical on every rank; ``HTMuon(..., process_group=pg)``): momentum runs
  everywhere; each rank computes its owned directions, then one ``all_gather`` shares them; the
  plug-in and the update run everywhere, so the optimizer state stays complete on every rank.
* **FSDP2** (``DTensor`` parameters from ``fully_shard``, detected automatically): momentum runs on
  the local shards; one ``all_to_all`` sends each owner the shards of its matrices, the owner
  assembles the whole matrix, computes the direction and the plug-in (NorMuon's row statistics on
  the whole matrix, with the whole second moment), and a second ``all_to_all`` sends each rank its
  shard of the result (and of the new second moment). Uneven and empty shards are fine. All state
  is stored as DTensors laid out like the parameter, so ``torch.distributed.checkpoint`` saves and
  reloads it (resharding included).

Each owner's result reaches the other ranks unchanged, so with the same gradients the parameters
equal the single-process run's bit for bit.

**Agreement.** A step starts with two small ``all_reduce`` (:meth:`DistributedStep.agree`): a
fixed-size checksum of the parameters' shapes and dtypes, every group setting, what this rank
resolves ``method="auto"`` / ``ns_dtype="auto"`` to, and the step counters (ranks that differ refuse
the step with one message naming what differs), then which parameters have gradients, whether they
are finite, and whether any rank refused the step while checking it, so the ranks refuse together
(under HSDP over the whole mesh, so the replicas too). A failure of one rank before a window's
exchange (momentum directions, directions, assembly, plug-in, packing; out of memory included)
travels in the header of the ``all_gather`` (DDP) or in the small ``all_reduce`` between the two
``all_to_all`` (FSDP2), before anything of the window is applied; one after an exchange is told at
the rank's next exchange (:class:`UnsharedFailure`), or, after the step's last one, makes every
later step refused until ``load_state_dict``. ``load_state_dict`` is agreed too
(:meth:`DistributedStep.agree_on_load`). No rank leaves a collective out that another rank enters.
Collectives wait at most the process group's timeout
(``torch.distributed.init_process_group(timeout=...)``).

Nothing here imports ``torch.distributed.tensor`` unless DTensors already exist, so the
single-process optimizer pays nothing for it.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from .functional import matrix_shape, second_moment_shape

__all__ = [
    "SIGNATURE_PARTS",
    "DistributedStep",
    "ShardLayout",
    "UnsharedFailure",
    "assign_owners",
    "check_group",
    "check_state_layout",
    "counter_fingerprint",
    "is_dtensor",
    "local_tensor",
    "matrix_cost",
    "matrix_shape",
    "plan_owned_windows",
    "plan_replicated_step",
    "setup",
    "signature_difference",
    "step_signature",
    "step_signatures",
]


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


def _dtensor_module() -> Any:
    """The loaded DTensor module, or ``None``: if it was never imported, no DTensor can exist.

    ``torch.distributed.tensor`` holds ``DTensor`` from torch 2.5; on torch 2.4 that package exists
    (tensor parallelism) without it, and DTensor lives in ``torch.distributed._tensor``."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "DTensor"):
            return mod
    return None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (free when DTensor was never imported)."""
    mod = _dtensor_module()
    return mod is not None and isinstance(t, mod.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage, so in-place updates stick), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def matrix_cost(shape: Sequence[int]) -> int:
    """Estimated cost of the spectral map on a ``(B, m, n)`` batch: ``B m n min(m, n)`` (SVD and NS alike)."""
    b, m, n = shape
    return b * m * n * min(m, n)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: greedy longest-processing-time (largest first, to the least-loaded rank).

    Deterministic (ties go to the lower index / lower rank), so every rank computes the same table.
    The makespan is at most 4/3 of the optimum (Graham's bound).

    Example:
        >>> assign_owners([4, 3, 3, 2], 2)
        [0, 1, 1, 0]
    """
    if world < 1:
        raise ValueError(f"Invalid world size: {world} (must be >= 1)")
    owners = [0] * len(costs)
    loads = [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def plan_owned_windows(
    keys: Sequence[Any],
    mshapes: Sequence[tuple[int, int, int]],
    itemsizes: Sequence[int],
    budget: int,
    world: int,
    work_itemsizes: Sequence[int | None] | None = None,
) -> tuple[F.StepPlan, list[int]]:
    """Owners for a whole step and windows in which every rank computes a share at the same time.

    The owners come from :func:`assign_owners` over every matrix of the step, not window by window:
    a window of one matrix (a large matrix fills a window alone) would otherwise always go to rank 0
    and leave the other ranks idle. Each rank's own matrices are then cut into windows by
    :func:`htmuon.functional.plan_step` with ``budget`` bytes (its own work and held directions), and
    window ``k`` of the step is every rank's ``k``-th window, so that within a window all ranks
    compute. ``peak_bytes`` is the largest of the ranks' own plans.

    Returns:
        ``(plan, owners)``: ``plan.windows[k]`` lists chunks of item indices (each chunk one rank's),
        ``owners[i]`` the rank that computes item ``i``.

    Example:
        >>> plan, owners = plan_owned_windows(["a"] * 4, [(1, 512, 512)] * 4, [4] * 4, 1, 2)
        >>> owners, plan.windows
        ([0, 1, 0, 1], (((0,), (1,)), ((2,), (3,))))
    """
    owners = assign_owners([matrix_cost(s) for s in mshapes], world)
    per_rank: list[list[list[tuple[int, ...]]]] = []
    peak = 0
    for r in range(world):
        idx = [i for i, o in enumerate(owners) if o == r]
        plan = F.plan_step(
            [keys[i] for i in idx],
            [mshapes[i] for i in idx],
            [itemsizes[i] for i in idx],
            budget,
            None if work_itemsizes is None else [work_itemsizes[i] for i in idx],
        )
        per_rank.append([[tuple(idx[j] for j in chunk) for chunk in window] for window in plan.windows])
        peak = max(peak, plan.peak_bytes)
    count = max((len(w) for w in per_rank), default=0)
    windows = tuple(
        tuple(chunk for r in range(world) if k < len(per_rank[r]) for chunk in per_rank[r][k])
        for k in range(count)
    )
    return F.StepPlan(windows, peak), owners


def plan_replicated_step(
    keys: Sequence[Any],
    mshapes: Sequence[tuple[int, int, int]],
    itemsizes: Sequence[int],
    chunk_bytes: int,
    world: int,
    work_itemsizes: Sequence[int | None] | None = None,
) -> tuple[F.StepPlan, list[int]]:
    """:func:`plan_owned_windows` for replicated (DDP) parameters: each rank plans its own matrices
    within ``chunk_bytes / world`` bytes, since every rank receives (and holds until the window is
    applied) the directions of the whole window; so a rank's transient memory stays near
    ``chunk_bytes``, as in a single process."""
    return plan_owned_windows(keys, mshapes, itemsizes, max(chunk_bytes // world, 1), world, work_itemsizes)


@dataclass(frozen=True)
class ShardLayout:
    """How a tensor of global ``shape`` lies on ``world`` ranks of a 1-D mesh.

    ``dim=None``: replicated (every rank holds all of it). Otherwise split along ``dim`` into
    ``torch.chunk``-style pieces, as DTensor's ``Shard(dim)`` (and FSDP2) do: ``ceil(size / world)``
    rows per rank, the last pieces shorter or empty.
    """

    shape: tuple[int, ...]
    dim: int | None
    world: int

    def bounds(self, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of ``rank``'s piece along ``dim`` (the whole extent if replicated)."""
        if self.dim is None:
            return 0, (self.shape[0] if self.shape else 1)
        size = self.shape[self.dim]
        chunk = -(-size // self.world)
        start = min(rank * chunk, size)
        return start, min(start + chunk, size)

    def local_shape(self, rank: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        start, stop = self.bounds(rank)
        return self.shape[: self.dim] + (stop - start,) + self.shape[self.dim + 1 :]

    def numel(self, rank: int) -> int:
        return math.prod(self.local_shape(rank))

    def index(self, rank: int) -> tuple[slice, ...]:
        """Index of ``rank``'s piece in the whole tensor."""
        if self.dim is None:
            return ()
        start, stop = self.bounds(rank)
        return (slice(None),) * self.dim + (slice(start, stop),)

    def sends(self, src: int, owner: int) -> bool:
        """Whether ``src`` sends its piece to ``owner`` to assemble the whole (replicated: owner has it)."""
        return self.dim is not None or src == owner


def _second_moment_dim(
    param_shape: tuple[int, ...], dim: int | None, batch_3d: bool, plugin: str | None = None
) -> int | None:
    """The dim of the ``(B, m, n)``-shaped second moment that lines up with the parameter's shard dim.

    ``None`` (keep it replicated) when the parameter is replicated or its shard dim is merged into
    the flattened columns of a conv kernel, or (with ``plugin``) when that dim of the moment is not the
    parameter's (NorMuon's ``(B, m, 1)`` moment of a matrix sharded along its columns).
    """
    if dim is None:
        return None
    if len(param_shape) == 2:
        vdim = dim + 1
    elif len(param_shape) == 3 and batch_3d:
        vdim = dim
    else:
        vdim = 1 if dim == 0 else None
    if vdim is not None and plugin is not None:
        vshape = second_moment_shape(matrix_shape(param_shape, batch_3d), plugin)
        if vshape[vdim] != param_shape[dim]:
            return None
    return vdim


def check_state_layout(param: Tensor, key: str, value: Any, group: dict[str, Any], where: str) -> None:
    """Refuse a DTensor state value of an HTMuon matrix laid out otherwise than the sharded step uses it
    (it reads the local shards as they are): ``momentum_buffer`` on the parameter's mesh with its
    placements, ``second_moment`` sharded along the dim that lines up with the parameter's shard dim
    (:func:`_second_moment_dim`). Before, such state (e.g. a column-sharded model's state dict loaded
    into a row-sharded one) loaded, and the next step failed with a bare size mismatch. Other state
    (AdamW's) is not checked: DTensor ops redistribute it."""
    if key not in ("momentum_buffer", "second_moment") or not (is_dtensor(param) and is_dtensor(value)):
        return
    mod = _dtensor_module()
    want = list(param.placements)
    if key == "second_moment":
        for k, placement in enumerate(want):
            if type(placement) is mod.Shard:
                vdim = _second_moment_dim(
                    tuple(param.shape), placement.dim % param.ndim, group["batch_3d"], group["plugin"]
                )
                want[k] = mod.Replicate() if vdim is None else mod.Shard(vdim)
    if value.device_mesh != param.device_mesh or list(value.placements) != want:
        raise ValueError(
            f"optimizer state of {where}: {key} has placements {tuple(value.placements)} on "
            f"{value.device_mesh}, where the step needs {tuple(want)} on {param.device_mesh} (the "
            f"parameter has {tuple(param.placements)}); a state dict of a model sharded otherwise: load "
            "it with torch.distributed.checkpoint (dcp.load + set_optimizer_state_dict), which lays the "
            "state out as this model's parameters"
        )


def check_group(group: dict[str, Any], index: int) -> None:
    """Refuse a param group that mixes DTensor parameters with plain tensors."""
    params = group["params"]
    kinds = [is_dtensor(p) for p in params]
    if any(kinds) and not all(kinds):
        d, t = kinds.index(True), kinds.index(False)
        names = group.get("param_names", group.get("names")) or []  # torch's key, or param_groups()'s

        def label(i: int) -> str:
            return repr(names[i]) if i < len(names) else f"{i}"

        raise ValueError(
            f"param group {index} mixes DTensor parameters (e.g. parameter {label(d)}, shape "
            f"{tuple(params[d].shape)}) with plain tensors (e.g. parameter {label(t)}, shape "
            f"{tuple(params[t].shape)}); shard the whole model with fully_shard, or put the plain "
            "tensors in a param group of their own"
        )


# --------------------------------------------------------------------------------------------
# Set-up: what is distributed, over which group
# --------------------------------------------------------------------------------------------


def _placement_dim(param: Tensor, mesh_dim: int, where: str) -> int | None:
    """Shard dim of a DTensor along mesh dim ``mesh_dim`` (``None``: replicated); clear error otherwise.

    Every other mesh dim must be replicated: FSDP2 (1-D mesh) and HSDP (``(Replicate(), Shard(d))``).
    """
    mod = _dtensor_module()
    for k, other in enumerate(param.placements):
        if k != mesh_dim and type(other) is not mod.Replicate:
            raise ValueError(
                f"{where}: placements {param.placements} on device mesh {param.device_mesh}: HTMuon "
                "supports DTensor parameters sharded along one mesh dimension (FSDP2, HSDP) and "
                "replicated along the others; tensor parallelism is not supported"
            )
    placement = param.placements[mesh_dim]
    if type(placement) is mod.Shard:
        return placement.dim % param.ndim
    if type(placement) is mod.Replicate:
        return None
    raise ValueError(
        f"{where}: unsupported DTensor placement {placement!r}; HTMuon supports Shard(dim) and Replicate()"
    )


def _shard_mesh_dim(params: list[Tensor]) -> int:
    """The mesh dimension the parameters are sharded along (the last one if none is sharded)."""
    mod = _dtensor_module()
    dims = sorted({k for p in params for k, pl in enumerate(p.placements) if type(pl) is not mod.Replicate})
    if len(dims) > 1:
        raise ValueError(
            f"DTensor parameters are sharded along mesh dimensions {dims} of {params[0].device_mesh}; "
            "HTMuon supports one sharded dimension (FSDP2, HSDP); tensor parallelism is not supported"
        )
    return dims[0] if dims else params[0].device_mesh.ndim - 1


def _group_ranks(pg: Any) -> list[int]:
    import torch.distributed as dist

    return list(dist.get_process_group_ranks(pg))


def setup(groups: list[dict[str, Any]], process_group: Any = None) -> DistributedStep | None:
    """The distributed step for these param groups, or ``None`` for the plain single-process step.

    DTensor parameters (FSDP2) are always handled over their device mesh's group; plain tensors are
    divided among the ranks of ``process_group`` if one is given (DDP), else handled locally.
    """
    located = [
        (gi, pi, p) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"]) if is_dtensor(p)
    ]
    if not located and process_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"process_group={process_group!r} was given but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first (or pass process_group=None)"
        )
    if process_group is not None and dist.get_rank(process_group) < 0:
        raise ValueError(
            f"this rank ({dist.get_rank()}) is not a member of process_group (ranks "
            f"{_group_ranks(process_group)})"
        )
    mesh_group, mesh_dim = None, 0
    if located:
        mesh = located[0][2].device_mesh
        for gi, pi, p in located:
            if p.device_mesh != mesh:
                raise ValueError(
                    f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) lives on device mesh "
                    f"{p.device_mesh}, another parameter on {mesh}; HTMuon needs all DTensor parameters "
                    "on one mesh"
                )
        mesh_dim = _shard_mesh_dim([p for _, _, p in located])
        for gi, pi, p in located:
            _placement_dim(p, mesh_dim, f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})")
        mesh_ranks = sorted(mesh.mesh.flatten().tolist())
        if process_group is not None and sorted(_group_ranks(process_group)) != mesh_ranks:
            raise ValueError(
                f"process_group has ranks {_group_ranks(process_group)} but the DTensor parameters "
                f"live on device mesh {mesh} (ranks {mesh_ranks}); pass process_group=None to use "
                "the mesh's groups"
            )
        mesh_group = mesh.get_group(mesh_dim)  # the ranks holding the shards of one replica
        if mesh.get_coordinate()[mesh_dim] != dist.get_rank(mesh_group):  # pragma: no cover - torch invariant
            raise RuntimeError(f"device mesh coordinate {mesh.get_coordinate()} != group rank")
        if mesh.ndim > 1 and len(mesh_ranks) == dist.get_world_size():
            # HSDP on every process: the replicas agree on a step too. (On a mesh over some of the
            # processes the agreement stays within each replica: a group over the mesh would need
            # every process, mesh or not, to create it.)
            return DistributedStep(process_group, mesh_group, mesh_dim, agree_group=dist.group.WORLD)
    return DistributedStep(replicated_group=process_group, mesh_group=mesh_group, mesh_dim=mesh_dim)


def step_signature(groups: list[dict[str, Any]]) -> int:
    """A checksum of what a step's collectives and math depend on: each parameter's shape and dtype,
    and each group's settings (:data:`SIGNATURE_PARTS`; ``chunk_bytes="auto"``, ``method="auto"`` and
    ``ns_dtype="auto"`` also as this rank resolves them). CRC-32 of :func:`step_signatures`: the same
    on every rank that steps the same parameters with the same settings, across processes."""
    return zlib.crc32(repr(step_signatures(groups)).encode())


#: The group settings compared between the ranks (every hyperparameter of a param group: those that
#: size the collectives -- a rank that differs would abort gloo or hang -- and those that change the
#: math, which would let the replicas drift apart or update a matrix's rows with different values).
SIGNATURE_SETTINGS = (
    "chunk_bytes",
    "batch_3d",
    "interval",
    "plugin",
    "compute_dtype",
    "method",
    "ns_dtype",
    "ns_steps",
    "p",
    "spectrum",
    "scale",
    "lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "lr_adjust",
    "beta2",
    "plugin_eps",
    "adamw_betas",
    "adamw_eps",
    "algorithm",
    "check_finite",
)
#: What :func:`step_signatures` checks apart, in the order of its values (the names the refusal gives):
#: the parameters, the settings, then what this rank resolves ``method`` and the Newton--Schulz working
#: dtype to (``"auto"`` follows the node's bfloat16 support, so nodes of different CPUs differ there).
SIGNATURE_PARTS = ("groups", "shapes", "dtypes", *SIGNATURE_SETTINGS, "resolved_method", "resolved_ns_dtype")

#: How the refusal names the resolved parts (the setting itself may be the same on every rank).
_RESOLVED_NAMES = {
    "resolved_method": (
        "the spectral backend that method resolves to on each node (method='auto' follows the node's "
        "bfloat16 matmul support; pass method= explicitly)"
    ),
    "resolved_ns_dtype": (
        "the Newton-Schulz working dtype that ns_dtype resolves to on each node (ns_dtype='auto' "
        "follows the node's bfloat16 matmul support; pass ns_dtype= explicitly)"
    ),
}


def _setting(value: Any) -> Any:
    """A group setting in a form that compares equal across processes exactly when the step would do the
    same with it: numbers as floats (``0`` and ``0.0`` alike), a 1-element tensor by its value (read on
    the host, as the eager step reads it anyway; not under ``torch.compile``, which must not read it:
    there only that it is a tensor), dtypes by name."""
    if isinstance(value, Tensor):
        if torch.compiler.is_compiling() or value.numel() != 1:
            return ("tensor", str(value.dtype), tuple(value.shape))
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (tuple, list)):
        return tuple(_setting(v) for v in value)
    if isinstance(value, torch.dtype):
        return str(value)
    try:
        return float(value)  # other real numbers (NumPy)
    except (TypeError, ValueError):
        return repr(value)


def _uses_htmuon(group: dict[str, Any]) -> bool:
    algorithm = group.get("algorithm", "htmuon")
    return algorithm == "htmuon" or (algorithm == "auto" and any(p.ndim >= 2 for p in group["params"]))


def _resolved(group: dict[str, Any]) -> tuple[Any, Any]:
    """``(backend, Newton--Schulz working dtype)`` this rank runs for the group's corrected steps and, with
    ``interval > 1``, its in-between polar steps (``None`` where the group runs none: an AdamW group,
    a backend that takes no ``ns_dtype``). Never raises: an invalid setting (refused by the step's own
    check on that rank) gives its ``repr``."""
    from .spectral import BACKENDS, ns_working_dtype, resolve_method

    if not group.get("params") or not _uses_htmuon(group):
        return None, None
    device = group["params"][0].device
    try:
        method = resolve_method(group.get("method", "auto"), group.get("spectrum", "power"), device)
    except Exception as exc:  # noqa: BLE001 - a signature, not a check
        return repr(exc), None
    backend = BACKENDS.get(method)
    uses_ns = group.get("interval", 1) != 1 or (backend is not None and "ns_dtype" in backend.options)
    if not uses_ns:
        return method, None
    try:
        return method, str(ns_working_dtype(group.get("ns_dtype", "auto"), device))
    except Exception as exc:  # noqa: BLE001
        return method, repr(exc)


def step_signatures(groups: list[dict[str, Any]]) -> list[int]:
    """:func:`step_signature` taken apart: one CRC-32 per entry of :data:`SIGNATURE_PARTS` (over every
    group, in order), so that ranks that differ can say in what. Never raises (it runs before the
    collective in which a rank that refused the step tells the others so)."""

    def budget(g: dict[str, Any]) -> Any:
        if g.get("chunk_bytes") == "auto" and g["params"]:
            return _setting(F.chunk_budget("auto", g["params"][0].device))
        return _setting(g.get("chunk_bytes"))

    def safely(fn: Any, g: dict[str, Any]) -> Any:
        try:
            return fn(g)
        except Exception as exc:  # noqa: BLE001 - e.g. a 2-element tensor lr: refused by the check
            return repr(exc)

    def setting(key: str) -> Any:
        return lambda g: budget(g) if key == "chunk_bytes" else _setting(g.get(key))

    resolved = [safely(_resolved, g) for g in groups]
    parts = {
        "groups": [len(g["params"]) for g in groups],
        "shapes": [[tuple(p.shape) for p in g["params"]] for g in groups],
        "dtypes": [[str(p.dtype) for p in g["params"]] for g in groups],
        **{key: [safely(setting(key), g) for g in groups] for key in SIGNATURE_SETTINGS},
        "resolved_method": [r[0] if isinstance(r, tuple) else r for r in resolved],
        "resolved_ns_dtype": [r[1] if isinstance(r, tuple) else r for r in resolved],
    }
    return [zlib.crc32(repr(parts[key]).encode()) for key in SIGNATURE_PARTS]


def signature_difference(low: list[int], high: list[int]) -> list[str]:
    """What differs between ranks, from the element-wise minimum and maximum over the ranks of
    ``[parameter count, *step_signatures(groups)]``: ``[]`` where nothing does. Where the count or the
    groups differ, only that is named (the lists of the other parts then differ too: not news); a
    resolved part is named only where the setting it comes from is the same on every rank."""
    if low[0] != high[0]:
        return ["the number of parameters"]
    differ = [name for name, a, b in zip(SIGNATURE_PARTS, low[1:], high[1:]) if a != b]
    if "groups" in differ:
        return ["the parameter groups (their number or sizes)"]
    sources = {
        "resolved_method": ("method", "spectrum", "algorithm"),
        "resolved_ns_dtype": ("ns_dtype", "method", "spectrum", "interval", "algorithm"),
    }
    return [
        _RESOLVED_NAMES.get(name, name)
        for name in differ
        if not any(source in differ for source in sources.get(name, ()))
    ]


def counter_fingerprint(groups: list[dict[str, Any]], state: Any) -> tuple[int, Tensor | None]:
    """The parameters' step counters as one number per rank: their sum weighted by position (the
    ``i``-th parameter, groups flattened in order, counts ``i`` times; one without a counter 0), so
    that ranks whose counters differ -- a checkpoint loaded on some ranks only, where ``interval``
    would take the corrected steps on other steps and the AdamW part's bias correction would differ --
    give different numbers. Counters on the CPU (the usual place) are summed here, with no device
    read; others on their device (returned as a tensor, added into the agreement's vector there)."""
    host, device_terms = 0, []
    i = 0
    for g in groups:
        for p in g["params"]:
            i += 1
            counter = (state.get(p) or {}).get("step")
            if counter is None:
                continue
            if isinstance(counter, Tensor) and counter.device.type != "cpu":
                device_terms.append(counter.to(torch.float64) * i)
            else:
                host += i * int(counter)
    if not device_terms:
        return host, None
    return host, torch.stack([t.to(device_terms[0].device) for t in device_terms]).sum()


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


class UnsharedFailure(Exception):
    """A failure of this rank after the last exchange of a window, so that the other ranks do not
    know of it (internal: the optimizer carries ``error`` to this rank's next exchange of the step,
    where every rank refuses the step, or, after the step's last exchange, to its next step's
    agreement). ``applied``: the parameters this rank had updated in the step by then."""

    def __init__(self, error: BaseException, applied: int = 0) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
        self.applied = applied


@dataclass
class CommStats:
    """Bytes this rank sent to / received from other ranks (self-copies excluded), and collectives."""

    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.collectives = 0


def _direction_wire_dtype(group: dict[str, Any], mats: Sequence[Tensor]) -> torch.dtype:
    """The dtype in which DDP ranks share directions: float64 wherever an owner's direction may be
    float64 (a float64 matrix, or ``compute_dtype=float64``, with which the exact backends return
    float64 from float32 input; ``ns_dtype`` cannot be float64), so that every rank continues
    (plug-in, update) from the owner's bits; float32 otherwise. Decided from the group alone, the
    same on every rank."""
    if any(x.dtype == torch.float64 for x in mats) or group.get("compute_dtype") == torch.float64:
        return torch.float64
    return torch.float32


def _promote(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    return reduce(torch.promote_types, dtypes)


class DistributedStep:
    """Communication around HTMuon's spectral map; one per optimizer (see the module docstring).

    Args:
        replicated_group: process group over which plain (replicated, DDP) parameters' spectral
            work is divided, or ``None`` (plain parameters stay local).
        mesh_group: the process group of the DTensor parameters' device mesh along its sharded
            dimension ``mesh_dim`` (the whole mesh for FSDP2; one replica's shard group for HSDP,
            each replica doing the same work), or ``None``.
        agree_group: the group that agrees on each step and on a failure while computing directions
            (default: ``replicated_group``, else ``mesh_group``; HSDP: the whole mesh, so that the
            replicas refuse a step together).
    """

    def __init__(
        self, replicated_group: Any = None, mesh_group: Any = None, mesh_dim: int = 0, agree_group: Any = None
    ) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.replicated_group = replicated_group
        self.mesh_group = mesh_group
        self.mesh_dim = mesh_dim
        self.agree_group = agree_group
        self.stats = CommStats()
        #: Set where this rank failed after an exchange of a step (:meth:`note_unshared_failure`).
        self.unshared_failure: str | None = None

    # ------------------------------------------------------------ agreement

    def _agree_group(self) -> Any:
        if self.replicated_group is not None:
            return self.replicated_group
        return self.agree_group if self.agree_group is not None else self.mesh_group

    def _check_same_step(
        self,
        groups: list[dict[str, Any]],
        device: torch.device,
        pg: Any,
        refused: bool = False,
        state: Any = None,
    ) -> None:
        """Refuse, on every rank, a step whose parameters or settings differ between the ranks: one
        fixed-size ``all_reduce`` (max of whether a rank refused the step while checking it, of the
        count, of each of :func:`step_signatures` and of the step counters' :func:`counter_fingerprint`
        (with ``state``), and of their negatives), before any collective whose size depends on them
        (which would otherwise abort or hang). The refusal names what differs.
        Where a rank refused the step already (``refused``), its own error says more: nothing is raised
        here and :meth:`agree` reports that refusal."""
        n = sum(len(g["params"]) for g in groups)
        host, on_device = counter_fingerprint(groups, state or {})
        mine = [n, *step_signatures(groups), host]
        vec = torch.tensor([int(refused), *mine, *(-v for v in mine)], dtype=torch.int64, device=device)
        own = None  # this rank's entries, where some are on the device only
        if on_device is not None:  # counters kept on an accelerator: added there, read with the rest
            add = on_device.to(device=device, dtype=torch.int64)
            vec[len(mine)] += add
            vec[2 * len(mine)] -= add
            own = vec[1 : 1 + len(mine)].clone()
        self._dist.all_reduce(vec, op=self._dist.ReduceOp.MAX, group=pg)
        self.stats.collectives += 1
        values = vec.cpu().tolist()
        if values[0]:
            return
        values = values[1:]
        high, low = values[: len(mine)], [-v for v in values[len(mine) :]]
        most, fewest = high[0], low[0]
        differ = signature_difference(low[:-1], high[:-1])
        if low[-1] != high[-1] and not differ:  # the same parameters and settings, other counters
            differ = [
                "the step counters (a checkpoint loaded on some ranks only, or a counter set on one: "
                "load the same checkpoint on every rank)"
            ]
        if differ:
            # every rank sees the same result, so every rank takes this one more collective: which
            # ranks differ from the group's first (the error path only)
            mine_t = own if own is not None else vec.new_tensor(mine)
            rows = [torch.empty_like(mine_t) for _ in range(self._dist.get_world_size(pg))]
            self._dist.all_gather(rows, mine_t, group=pg)
            self.stats.collectives += 1
            rows = [r.cpu().tolist() for r in rows]
            ranks = self._ranks(pg, len(rows))
            others = [str(ranks[i]) for i, r in enumerate(rows) if r != rows[0]]
            raise RuntimeError(
                f"the ranks step different parameters or settings (this rank: {n} parameter(s), "
                f"the ranks: {fewest} to {most}; differing: {', '.join(differ)}; rank(s) "
                f"{', '.join(others)} differ from rank {ranks[0]}): build the optimizer over the same "
                "parameters with the same settings on every rank (and change its settings, such as a "
                "scheduled lr, on every rank alike); the step was refused on every rank"
            )

    def _ranks(self, pg: Any, world: int) -> list[int]:
        """The global ranks of ``pg``'s members, in group order."""
        try:
            return list(self._dist.get_process_group_ranks(pg))
        except (AttributeError, RuntimeError, ValueError):  # older torch: ranks within the group
            return list(range(world))

    def agree(self, groups: list[dict[str, Any]], error: BaseException | None, state: Any = None) -> Tensor:
        """Agree among the ranks, before anything changes, on a step: two small ``all_reduce``.

        Args:
            groups: the optimizer's param groups.
            error: this rank's refusal of the step while checking it, or ``None``.
            state: the optimizer's state (its step counters are compared too), or ``None``.

        Returns:
            One bool per parameter (groups flattened in order): ``True`` unless the gradient holds
            NaN/Inf on some rank (checked where the group has ``check_finite``). The same on every rank.

        Raises:
            ``error`` on the rank that refused, a RuntimeError on the others; a RuntimeError on every
            rank if some parameter has a gradient on some ranks and ``None`` on others, or if the ranks'
            parameters or settings differ.
        """
        if error is None and self.unshared_failure is not None:
            error = RuntimeError(self.unshared_failure)
        params = [(g, p) for g in groups for p in g["params"]]
        has = [p.grad is not None for _, p in params]
        finite = []
        for (g, p), h in zip(params, has):
            if h and g.get("check_finite", True) and not p.grad.is_sparse:
                finite.append(F.all_finite(local_tensor(p.grad)))
            else:
                finite.append(torch.ones((), dtype=torch.bool))
        device = next((local_tensor(p).device for _, p in params), torch.device("cpu"))
        vec = torch.cat(
            [
                torch.tensor([0 if error is None else 1] + [int(h) for h in has], dtype=torch.int32),
                torch.stack(finite).to(torch.int32).cpu() if finite else torch.zeros(0, dtype=torch.int32),
            ]
        ).to(device)
        pg = self._agree_group()
        world = self._dist.get_world_size(pg)
        if world > 1:
            self._check_same_step(groups, device, pg, refused=error is not None, state=state)
            self._dist.all_reduce(vec, op=self._dist.ReduceOp.SUM, group=pg)
            self.stats.collectives += 1
        counts = vec.cpu().tolist()
        if counts[0]:
            if error is not None:
                raise error
            raise RuntimeError(
                f"{counts[0]} other rank(s) refused this step while checking it (see their error); "
                "the step was refused on every rank and nothing was changed"
            )
        n = len(params)
        for i, c in enumerate(counts[1 : 1 + n]):
            if 0 < c < world:
                shape = tuple(params[i][1].shape)
                raise RuntimeError(
                    f"parameter {i} (shape {shape}) has a gradient on {c} of {world} ranks and none on the "
                    "others; under a process group every rank must step the same parameters (zero the "
                    "gradient instead of leaving it None); the step was refused on every rank"
                )
        return torch.tensor([c == world for c in counts[1 + n :]], dtype=torch.bool)

    def agree_on_load(self, refused: bool, device: torch.device) -> list[int]:
        """The ranks that refused a ``load_state_dict`` (one small ``all_reduce`` over the group that
        agrees on steps; none with a group of one rank)."""
        pg = self._agree_group()
        world = self._dist.get_world_size(pg)
        if world == 1:
            return [self._dist.get_rank()] if refused else []
        flags = torch.zeros(world, dtype=torch.int32, device=device)
        flags[self._dist.get_rank(pg)] = int(refused)
        self._dist.all_reduce(flags, op=self._dist.ReduceOp.SUM, group=pg)
        self.stats.collectives += 1
        return [r for r, f in zip(self._ranks(pg, world), flags.tolist()) if f]

    def exchanges(self, params: list[Tensor]) -> bool:
        """Whether a group of these parameters runs collectives in its step (DTensors, or plain
        tensors divided among the ranks of ``process_group``); otherwise each rank steps it alone."""
        return self.sharded(params) or self.divides()

    def others(self) -> bool:
        """Whether this rank agrees its steps with other ranks (a group of more than one)."""
        return self._dist.get_world_size(self._agree_group()) > 1

    def note_unshared_failure(self, error: BaseException) -> None:
        """Remember that this rank failed after an exchange of a step, so that the other ranks may have
        applied what this rank did not (told at its next exchange, every rank refuses the rest of the
        step; after the step's last exchange, the others complete it): its next step (and every one
        after it, until ``load_state_dict`` restores the state) is refused on every rank, rather than
        the replicas or shards going on from different states."""
        if self.others():
            self.unshared_failure = (
                f"this rank failed an earlier step after an exchange with the other ranks "
                f"({type(error).__name__}: {error}); they may have applied what this rank did not, so "
                "the ranks' parameters or optimizer state may differ, and every step is refused until "
                "a checkpoint is loaded into the model and the optimizer on every rank (load_state_dict)"
            )

    # ------------------------------------------------------------ DDP

    @staticmethod
    def sharded(params: list[Tensor]) -> bool:
        """Whether a group's parameters are DTensors (groups are homogeneous, see :func:`check_group`)."""
        return bool(params) and is_dtensor(params[0])

    def divides(self) -> bool:
        """Whether plain (replicated) parameters' spectral work is divided among more than one rank."""
        pg = self.replicated_group
        return pg is not None and self._dist.get_world_size(pg) > 1

    def plan(
        self,
        keys: Sequence[Any],
        mshapes: Sequence[tuple[int, int, int]],
        itemsizes: Sequence[int],
        budget: int,
        work_itemsizes: Sequence[int | None] | None = None,
    ) -> tuple[F.StepPlan, list[int]]:
        """:func:`plan_replicated_step` over this step's replicated group."""
        world = self._dist.get_world_size(self.replicated_group)
        return plan_replicated_step(keys, mshapes, itemsizes, budget, world, work_itemsizes)

    def replicated_rank(self) -> int:
        """This process's rank in the replicated group (0 without one)."""
        pg = self.replicated_group
        return 0 if pg is None else self._dist.get_rank(pg)

    def compute_directions(
        self,
        group: dict[str, Any],
        mats: list[Tensor],
        corrected: list[bool],
        owners: Sequence[int] | None = None,
        device: torch.device | None = None,
        error: BaseException | None = None,
    ) -> list[Tensor]:
        """Spectral map of replicated matrices: each rank computes its owned share, one all_gather.

        ``owners``: the rank computing each matrix (from :meth:`plan`, for the whole step); by default
        :func:`assign_owners` over ``mats`` alone. With ``owners`` given, the matrices this rank does not
        own are only read for their shape and dtype, so they may be ``meta`` tensors (the optimizer
        builds no momentum direction for them); ``device`` is then where the exchange runs. Each
        rank's part starts with a status (0: computed, 1: failed), so a failure on one rank reaches
        every rank in the same collective and all of them refuse the step. ``error``: this rank's
        failure earlier in the step (building its momentum directions, or a window before: then
        ``mats`` may all be ``meta``): it computes nothing, sends the failure and raises ``error``.

        Raises:
            ``error``, or this rank's failure while computing or packing its share, and on the other
            ranks a RuntimeError naming it: every rank raises together, right after the exchange.
            :class:`UnsharedFailure` for a failure while unpacking the received directions (after the
            exchange: the other ranks go on).
        """
        pg = self.replicated_group
        world = 1 if pg is None else self._dist.get_world_size(pg)
        if world == 1:
            if error is not None:
                raise error
            return F.compute_directions(mats, corrected, group)
        rank = self._dist.get_rank(pg)
        if owners is None:
            owners = assign_owners([matrix_cost(x.shape) for x in mats], world)
        mine = [i for i, o in enumerate(owners) if o == rank]
        # The single-process chain continues in float32 (float64 kept) and on the direction's own
        # memory layout (a transposed view for tall matrices; reductions in the plug-in depend on
        # it), so a one-number header per matrix says which dtype and whether transposed.
        wire = _direction_wire_dtype(group, mats)
        if device is None:
            device = mats[0].device
        sizes = [1] * world
        for i, o in enumerate(owners):
            sizes[o] += 1 + mats[i].numel()
        width = max(sizes)
        dirs: list[Tensor] = []
        send = None
        if error is None:
            try:  # everything this rank does before the exchange: a failure is sent, not raised
                dirs = F.compute_directions([mats[i] for i in mine], [corrected[i] for i in mine], group)
                transposed = [not d.is_contiguous() and d.mT.is_contiguous() for d in dirs]
                codes = [0.0] + [float(d.dtype == torch.float64) + 2.0 * t for d, t in zip(dirs, transposed)]
                parts = [torch.tensor(codes, dtype=wire, device=device)]
                parts += [(d.mT if t else d).reshape(-1).to(wire) for d, t in zip(dirs, transposed)]
                parts.append(torch.zeros(width - sizes[rank], dtype=wire, device=device))
                send = torch.cat(parts)
                del parts
            except Exception as exc:  # shared below, so that no rank waits for this one
                error = exc
        if error is not None:
            dirs, send = [], torch.zeros(width, dtype=wire, device=device)
            send[0] = 1.0
        gathered = [torch.empty(width, dtype=wire, device=device) for _ in range(world)]
        self._dist.all_gather(gathered, send, group=pg)
        del send
        item = gathered[0].element_size()
        self.stats.bytes_sent += (world - 1) * width * item
        self.stats.bytes_received += (world - 1) * width * item
        self.stats.collectives += 1
        status = torch.stack([g[0] for g in gathered]).tolist()
        failed = [r for r, s in zip(self._ranks(pg, world), status) if s != 0.0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(
                f"rank(s) {failed} failed in this step (see their error); the step was refused on every rank"
            )
        try:
            out: list[Tensor | None] = [None] * len(mats)
            for r in range(world):
                owned = [i for i, o in enumerate(owners) if o == r]
                if r == rank:
                    for i, d in zip(owned, dirs):
                        out[i] = d
                    continue
                header, offset = gathered[r][1 : 1 + len(owned)].tolist(), 1 + len(owned)
                for i, code in zip(owned, header):
                    shape = mats[i].shape
                    n = mats[i].numel()
                    d = gathered[r][offset : offset + n]
                    d = d.view(*shape[:-2], shape[-1], shape[-2]).mT if code >= 2 else d.view(shape)
                    out[i] = d.to(torch.float64 if code % 2 else torch.float32)
                    offset += n
        except Exception as exc:
            raise UnsharedFailure(exc) from exc
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------ FSDP2

    def sharded_htmuon_step(
        self,
        opt: Any,
        group: dict[str, Any],
        params: list[Tensor],
        applied: int = 0,
        failed: BaseException | None = None,
    ) -> int:
        """The HTMuon step of a group of DTensor parameters (see the module docstring), window by window.

        The owners are chosen for the whole step and each rank's matrices taken in windows of
        ``chunk_bytes`` (:func:`plan_owned_windows`: up to ``world * chunk_bytes`` of whole matrices per
        window, every rank computing a share): each window is exchanged, computed by its owners and
        applied before the next one starts, so the transient memory of a step stays bounded however
        deep the model is, as in the single-process step.

        A failure of this rank before a window's agreement on failures (checking and laying out a
        parameter, its momentum direction, assembling, computing, the plug-in, packing the results;
        an out-of-memory error included) does not stop it: it takes part in the window's exchanges with
        zeros and a failure status, so that every rank refuses the step at that agreement. ``failed``:
        such a failure earlier in the step (another group), told at this group's first window.

        Args:
            applied: parameters this rank updated in the step before this group.

        Returns:
            ``applied`` plus this group's parameters.

        Raises:
            The failure, on every rank together (said to have followed ``applied`` updated parameters
            where some were); :class:`UnsharedFailure` where this rank failed after the group's last
            exchange (applying its last window): the caller tells the others at its next exchange.
        """
        world, rank = self._dist.get_world_size(self.mesh_group), self._dist.get_rank(self.mesh_group)
        error = failed
        items = None
        if error is None:
            try:
                items = [self._prepare(opt, group, p, world, rank, self.mesh_dim) for p in params]
            except Exception as exc:  # told at the first window's agreement
                error = exc
        if items is None:  # shapes and placements: enough to take part in the exchanges
            items = [self._layout(opt, group, p, world, self.mesh_dim) for p in params]
        plan, owners = plan_owned_windows(
            [(it.mshape[1:], it.param.dtype, it.corrected) for it in items],
            [it.mshape for it in items],
            [it.param.element_size() for it in items],
            F.chunk_budget(group["chunk_bytes"], params[0].device),
            world,
        )
        beta, nesterov, plugin = float(group["momentum"]), group["nesterov"], group["plugin"]
        for window in plan.windows:
            index = [i for chunk in window for i in chunk]
            part = [items[i] for i in index]
            try:
                if error is None:
                    try:  # N_t of this window only (its sign under AdaMuon: elementwise, per shard)
                        for it in part:
                            it.update = F.plugin_input_(
                                F.momentum_direction(it.grad, it.buf, beta, nesterov), plugin
                            )
                    except Exception as exc:  # told at this window's agreement
                        error = exc
                self._sharded_window(opt, group, part, world, rank, [owners[i] for i in index], error)
            except UnsharedFailure as exc:  # applying the window: the others applied theirs
                error, applied = exc.error, applied + exc.applied
                self.note_unshared_failure(error)
            except Exception as exc:  # every rank raises it, together
                if not applied:
                    raise
                raise F.partial_step_error(exc, applied, group["chunk_bytes"]) from exc
            else:
                applied += len(part)
            finally:
                for it in part:
                    it.update = None
        if error is not None:
            raise UnsharedFailure(error, applied)
        return applied

    def _sharded_window(
        self,
        opt: Any,
        group: dict[str, Any],
        items: list[_ShardedItem],
        world: int,
        rank: int,
        owners: Sequence[int],
        error: BaseException | None = None,
    ) -> None:
        """Exchange, compute and apply one window of a sharded step (every rank calls it in step);
        ``owners[i]``: the rank that computes ``items[i]`` (see :func:`plan_owned_windows`). ``error``:
        this rank's failure so far in the step: it sends zeros and a failure status, and raises it.

        The collectives: an ``all_to_all`` (shards to owners), an ``all_reduce`` that agrees on
        failures, an ``all_to_all`` (result shards back). Everything that can fail on one rank but the
        in-place updates comes before the agreement and is caught there (the results are packed, and
        the buffer they are received in allocated, before it), so every rank raises together; a
        failure while applying raises :class:`UnsharedFailure` (the others applied theirs)."""
        mine = [i for i, o in enumerate(owners) if o == rank]
        wire = _promote([it.param.dtype for it in items])
        device = local_tensor(items[0].param).device
        # the exchanges' sizes, from the layouts alone (the same whatever fails below)
        owned_by = [[it for it, o in zip(items, owners) if o == r] for r in range(world)]
        layouts_of = [l for i in mine for l in items[i].layouts()]  # what this rank assembles
        to_owner = [
            sum(l.numel(rank) for it in owned_by[r] for l in it.layouts() if l.sends(rank, r))
            for r in range(world)
        ]
        from_src = [sum(l.numel(r) for l in layouts_of if l.sends(r, rank)) for r in range(world)]
        back_to = [sum(l.numel(r) for l in layouts_of) for r in range(world)]
        back_from = [sum(l.numel(rank) for it in owned_by[r] for l in it.layouts()) for r in range(world)]

        # 1) every owner receives the shards of its matrices (and of their second moments)
        sendbuf = None
        if error is None:
            try:
                send = [
                    [t for it in owned_by[r] for t, l in it.pieces() if l.sends(rank, r)]
                    for r in range(world)
                ]
                sendbuf = self._pack(send, wire, device)
                del send
                if sendbuf.numel() != sum(to_owner):  # the state's layout is not the parameter's
                    raise RuntimeError(
                        f"rank {rank} would send {sendbuf.numel()} elements where the layouts give "
                        f"{sum(to_owner)}"
                    )
            except Exception as exc:  # agreed below
                error = exc
        if error is not None:
            sendbuf = torch.zeros(sum(to_owner), dtype=wire, device=device)
        recv = self._all_to_all(sendbuf, to_owner, from_src, device, rank)
        del sendbuf

        # 2) each owner assembles its whole matrices, runs the spectral map (batched) and the plug-in,
        # and packs each rank's shard of the results
        back = received = None
        if error is None:
            try:
                back = self._compute_owned(group, items, mine, recv, world, rank, wire, device)
                received = torch.empty(sum(back_from), dtype=wire, device=device)
            except Exception as exc:  # agreed below, so that no rank waits for this one
                error, back, received = exc, None, None
        del recv
        status = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
        self._dist.all_reduce(status, op=self._dist.ReduceOp.SUM, group=self._agree_group())
        self.stats.collectives += 1
        if error is not None:
            raise error
        if status.item():
            raise RuntimeError(
                f"{status.item()} other rank(s) failed in this step (see their error); "
                "the step was refused on every rank"
            )

        # 3) every rank receives its shard of each direction (and of the new second moment)
        recv = self._all_to_all(back, back_to, back_from, device, rank, received)
        del back

        # 4) store the state and update the local shards, as in the single-process step
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta = float(group["momentum"])
        offsets = [0] * world
        done = 0
        try:
            for it, src in zip(items, owners):
                pieces = []
                for layout in it.layouts():
                    n = layout.numel(rank)
                    piece = recv[src][offsets[src] : offsets[src] + n].view(layout.local_shape(rank))
                    pieces.append(piece.to(it.param.dtype))
                    offsets[src] += n
                state = opt.state[it.param]
                state.update(it.new_state)
                F.commit_momentum_(local_tensor(state["momentum_buffer"]), local_tensor(it.param.grad), beta)
                state["step"] += 1
                if it.second_moment is not None:
                    it.second_moment.copy_(pieces[1])
                scale = F.lr_scale(it.mshape[1], it.mshape[2], group["lr_adjust"])
                F.decoupled_update_(it.local, pieces[0], lr, wd, scale)
                done += 1
        except Exception as exc:
            raise UnsharedFailure(exc, done) from exc

    @staticmethod
    def _compute_owned(
        group: dict[str, Any],
        items: list[_ShardedItem],
        mine: list[int],
        recv: list[Tensor],
        world: int,
        rank: int,
        wire: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """Assemble this rank's whole matrices (and second moments) from the received shards, compute
        their directions and plug-in, and pack each rank's shard of the results (in rank order)."""
        batch_3d, plugin = group["batch_3d"], group["plugin"]
        wholes = {
            i: [torch.empty(l.shape, dtype=items[i].param.dtype, device=device) for l in items[i].layouts()]
            for i in mine
        }
        for src in range(world):
            offset = 0
            for i in mine:
                for whole, layout in zip(wholes[i], items[i].layouts()):
                    if layout.sends(src, rank):
                        n = layout.numel(src)
                        piece = recv[src][offset : offset + n]
                        whole[layout.index(src)] = piece.view(layout.local_shape(src))
                        offset += n
        mats = [F.matrix_view(wholes[i][0], batch_3d) for i in mine]
        directions = F.compute_directions(mats, [items[i].corrected for i in mine], group)
        del mats
        for i, O in zip(mine, directions):
            if plugin is not None:  # on the whole matrix, with the whole second moment
                O, wholes[i][1] = F.second_moment_normalize(
                    O, wholes[i][1], group["beta2"], group["plugin_eps"], plugin
                )
            wholes[i][0] = O.reshape(items[i].layout.shape).to(items[i].param.dtype)
        del directions
        send = [
            [whole[l.index(dst)] for i in mine for whole, l in zip(wholes[i], items[i].layouts())]
            for dst in range(world)
        ]
        return DistributedStep._pack(send, wire, device)

    @staticmethod
    def _layout(opt: Any, group: dict[str, Any], p: Tensor, world: int, mesh_dim: int) -> _ShardedItem:
        """How one DTensor parameter's sharded step is laid out, from its shape, placements and step
        count alone (nothing allocated, no tensor read: enough to take part in the exchanges)."""
        state = opt.state.get(p) or {}
        shape = tuple(p.shape)
        dim = _placement_dim(p, mesh_dim, f"parameter of shape {shape}")
        mshape = matrix_shape(shape, group["batch_3d"])
        step = int(state["step"]) + 1 if state else 1
        corrected = F.is_corrected(step, group["interval"])
        item = _ShardedItem(p, ShardLayout(shape, dim, world), mshape, corrected)
        plugin = group["plugin"]
        if plugin is not None:
            vshape = second_moment_shape(mshape, plugin)
            vdim = _second_moment_dim(shape, dim, group["batch_3d"], plugin)
            item.second_moment_layout = ShardLayout(vshape, vdim, world)
        return item

    @staticmethod
    def _prepare(
        opt: Any, group: dict[str, Any], p: Tensor, world: int, rank: int, mesh_dim: int
    ) -> _ShardedItem:
        """Check one DTensor parameter and lay out its sharded step; state to create is kept aside."""
        item = DistributedStep._layout(opt, group, p, world, mesh_dim)
        state = opt.state.get(p) or {}
        grad, local = local_tensor(p.grad), local_tensor(p)
        if grad.shape != local.shape:
            raise RuntimeError(
                f"gradient shard of shape {tuple(grad.shape)} does not match the parameter shard "
                f"{tuple(local.shape)} (placements {p.grad.placements} vs {p.placements})"
            )
        if item.layout.local_shape(rank) != tuple(local.shape):
            raise RuntimeError(
                f"parameter shard of shape {tuple(local.shape)} on rank {rank}, where its placements "
                f"{p.placements} give {item.layout.local_shape(rank)}"
            )
        new_state: dict[str, Any] = {}
        if not state:
            new_state = {"step": torch.tensor(0.0), "momentum_buffer": torch.zeros_like(p)}
        item.local, item.grad = local, grad
        item.buf = local_tensor((state or new_state)["momentum_buffer"])
        item.new_state = new_state
        layout = item.second_moment_layout
        if layout is not None:
            if "second_moment" not in state:  # a DTensor laid out like the rows it belongs to
                dtm = _dtensor_module()
                new_state["second_moment"] = dtm.zeros(
                    layout.shape,
                    dtype=p.dtype,
                    device_mesh=p.device_mesh,
                    placements=[
                        dtm.Shard(layout.dim) if k == mesh_dim and layout.dim is not None else dtm.Replicate()
                        for k in range(p.device_mesh.ndim)
                    ],
                )
            v = new_state["second_moment"] if "second_moment" in new_state else state["second_moment"]
            item.second_moment = local_tensor(v)
            if tuple(item.second_moment.shape) != layout.local_shape(rank):
                raise RuntimeError(
                    f"second moment shard of shape {tuple(item.second_moment.shape)} for a parameter of "
                    f"shape {tuple(p.shape)} (placements {p.placements}); its layout gives "
                    f"{layout.local_shape(rank)}"
                )
        return item

    @staticmethod
    def _pack(send: list[list[Tensor]], wire: torch.dtype, device: torch.device) -> Tensor:
        """One flat buffer of ``send``'s tensors in order, in ``wire``."""
        flat = [t.reshape(-1).to(wire) for chunks in send for t in chunks]
        return torch.cat(flat) if flat else torch.empty(0, dtype=wire, device=device)

    def _all_to_all(
        self,
        sendbuf: Tensor,
        send_sizes: list[int],
        recv_sizes: list[int],
        device: torch.device,
        rank: int,
        recvbuf: Tensor | None = None,
    ) -> list[Tensor]:
        """One ``all_to_all_single`` (uneven splits); returns the received buffer split by source rank."""
        if recvbuf is None:
            recvbuf = torch.empty(sum(recv_sizes), dtype=sendbuf.dtype, device=device)
        self._dist.all_to_all_single(recvbuf, sendbuf, recv_sizes, send_sizes, group=self.mesh_group)
        item = recvbuf.element_size()
        self.stats.bytes_sent += (sum(send_sizes) - send_sizes[rank]) * item
        self.stats.bytes_received += (sum(recv_sizes) - recv_sizes[rank]) * item
        self.stats.collectives += 1
        return list(recvbuf.split(recv_sizes))


@dataclass
class _ShardedItem:
    """One DTensor parameter during a sharded step: local views and how the whole is laid out (only the
    layouts where the rank failed before preparing it: it then sends zeros of their sizes)."""

    param: Tensor
    layout: ShardLayout
    mshape: tuple[int, int, int]
    corrected: bool
    local: Tensor | None = None  # this rank's shard of the parameter (updated in place)
    grad: Tensor | None = None  # this rank's shard of the gradient
    buf: Tensor | None = None  # this rank's shard of the momentum buffer (a new zero one on the first step)
    second_moment: Tensor | None = None  # this rank's piece of the plug-in's second moment
    second_moment_layout: ShardLayout | None = None
    new_state: dict[str, Any] = field(default_factory=dict)  # state to create when the step is applied
    update: Tensor | None = None  # this rank's shard of N_t, while the item's window runs

    def pieces(self) -> list[tuple[Tensor, ShardLayout]]:
        """(local piece, layout) of what an owner needs: the direction's input, then the second moment."""
        out = [(self.update, self.layout)]
        if self.second_moment_layout is not None:
            out.append((self.second_moment, self.second_moment_layout))
        return out  # type: ignore[return-value]

    def layouts(self) -> list[ShardLayout]:
        out = [self.layout]
        if self.second_moment_layout is not None:
            out.append(self.second_moment_layout)
        return out
