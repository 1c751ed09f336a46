"""The pure pieces of the HTMuon matrix update, as free functions (torch.optim keeps its math the same way).

:class:`htmuon.HTMuon` (single process and DDP) and the FSDP2 step of :mod:`htmuon.distributed` both
call these; neither module holds any of the math itself. Nothing here mutates its inputs unless the
name ends in ``_`` (``commit_momentum_``, ``decoupled_update_``), ``out=`` is given
(``momentum_direction``), or it is the AdamW part (``adamw``, ``adamw_masked``: parameters and
state in place, as torch's functional ``adamw``), so a step can compute every direction first and
change parameters and state only once everything is known to be good.

The memory plan (:func:`plan_step`) is also here: the matrices are batched by shape, the batches cut
into chunks, and the chunks grouped into *windows* whose transient bytes (stacked inputs, backend
workspace, the directions held until the window is applied) stay within a budget, ``chunk_bytes``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .spectral import (
    BACKENDS,
    _raw_scale_is_bounded,
    abs_max,
    aminmax,
    host_path,
    no_host_reads,
    ns_working_dtype,
    polar,
    resolve_method,
    spectral_map,
)

__all__ = [
    "ACCELERATOR_CHUNK_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "chunk_budget",
    "default_chunk_bytes",
    "all_finite",
    "finite_flags",
    "NonFiniteGradientError",
    "compute_directions",
    "StepPlan",
    "adamw",
    "adamw_masked",
    "chunk_work_bytes",
    "MATMUL_BACKENDS",
    "work_itemsize",
    "commit_momenta_",
    "commit_momentum_",
    "decoupled_update_",
    "decoupled_updates_",
    "direction",
    "exact_direction",
    "is_corrected",
    "is_finite",
    "lr_scale",
    "matrix_shape",
    "matrix_view",
    "momentum_direction",
    "stacked_momentum_directions",
    "partial_step_error",
    "plan_step",
    "plugin_input_",
    "second_moment_normalize",
    "second_moment_shape",
]

#: Memory budget of a step's transient tensors on CPU (see :func:`plan_step`): 32 MiB. On the
#: LLaMA-135M matrix set this keeps HTMuon's peak within torch.optim.Muon's + 10% of the parameter
#: bytes, whatever the depth (tests/test_optim.py::test_memory_plan_*).
DEFAULT_CHUNK_BYTES = 32 * 2**20
#: The budget on an accelerator (CUDA, ...): 48 MiB. There a chunk costs the host ~65 kernel
#: launches (~95 operators with views: scaling, checks, stacking, the iterations) whatever its size,
#: so small chunks make the step host-bound (on an H200, 32 MiB cut the LLaMA-135M set into 84 chunks,
#: one per matrix, at 4.3x torch.optim.Muon's time: BENCHMARKS.md §A-7). Since the plan models the
#: matmul backends' working dtype (:func:`work_itemsize`; bfloat16 on GPUs), 48 MiB makes 30 chunks
#: of that set, 2,908 operators (1,959 launches) against Muon's 2,400 (1,934), and a measured peak of
#: 41 MiB, within issue 11's bound (Muon's 14.4 MiB + 10% of the parameter bytes = 46.8 MiB; counted
#: on a CPU on the GPU's code path, §A-11). 512 MiB (the default until session 29) makes 3 chunks,
#: 378 operators and a measured peak of 441 MiB: pass ``chunk_bytes=512 * 2**20`` where memory is
#: plentiful. The bound does not grow with depth.
ACCELERATOR_CHUNK_BYTES = 48 * 2**20


def default_chunk_bytes(device_type: str | torch.device) -> int:
    """The ``chunk_bytes="auto"`` budget on a device: :data:`DEFAULT_CHUNK_BYTES` on the CPU,
    :data:`ACCELERATOR_CHUNK_BYTES` elsewhere. ``device_type``: a ``torch.device`` or a string (a
    device type such as ``"cuda"``, or a device such as ``"cuda:1"``).

    Example:
        >>> default_chunk_bytes("cpu") // 2**20, default_chunk_bytes("cuda") // 2**20
        (32, 48)
        >>> default_chunk_bytes(torch.device("cpu")) == default_chunk_bytes("cpu")
        True
    """
    if isinstance(device_type, torch.device):
        device_type = device_type.type
    elif not isinstance(device_type, str):
        raise TypeError(
            f"default_chunk_bytes: expected a torch.device or a device string such as 'cpu' or 'cuda', "
            f"got {type(device_type).__name__} {device_type!r}"
        )
    return DEFAULT_CHUNK_BYTES if device_type.partition(":")[0] == "cpu" else ACCELERATOR_CHUNK_BYTES


def chunk_budget(chunk_bytes: int | str, device: torch.device) -> int:
    """A group's ``chunk_bytes`` in bytes on ``device`` (``"auto"``: :func:`default_chunk_bytes`)."""
    return default_chunk_bytes(device.type) if chunk_bytes == "auto" else int(chunk_bytes)


#: Workspace of a spectral backend, in units of its float32 ``m x n`` input and of the float32
#: ``k x k`` Gram matrix (``k = min(m, n)``): an upper estimate for the library's backends (eigh works
#: on a float64 Gram matrix and its eigenvectors, Newton--Schulz holds ~3 iterates).
WORKSPACE_MN = 4
WORKSPACE_KK = 4


class NonFiniteGradientError(RuntimeError):
    """A gradient (or the momentum built from it) holds NaN or Inf; the step was refused."""


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def all_finite(t: Tensor) -> Tensor:
    """Whether every entry of ``t`` is finite, as a 0-d bool tensor (no host synchronisation).

    On CPU one ``aminmax`` pass: a NaN propagates to both ends and an Inf is the minimum or the
    maximum. There this is ~20x faster than ``torch.isfinite(t).all()``, which writes a bool temporary
    and makes three elementwise passes (measured 0.7 vs 16.7 ms on a 4 x 512 x 1376 float32 tensor).
    On the accelerator paths (:func:`htmuon.spectral.host_path`) one ``vector_norm(ord=inf)``
    reduction, whose single result needs half the 0-d operators (launches there).
    """
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    if not host_path(t.device):
        # accelerators, compiled steps: max |t_ij| in one reduction kernel (a NaN propagates, an Inf is
        # the maximum, a finite maximum cannot overflow), then one comparison: NaN < inf and inf < inf
        # are false (torch.isfinite would be four 0-d kernels: abs, ne, eq, mul)
        return torch.linalg.vector_norm(t, ord=math.inf) < math.inf
    lo, hi = aminmax(t)  # in memory order: a transposed view is not copied first
    return torch.isfinite(lo) & torch.isfinite(hi)


def finite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """:func:`all_finite` of each tensor, as a bool tensor, screened first by one foreach norm.

    ``torch._foreach_norm`` (the 2-norm, as ``clip_grad_norm_`` uses it) takes every tensor in one
    call -- on CUDA a few multi-tensor kernels instead of the 5 operators per tensor of
    :func:`all_finite` there, each a launch -- and a NaN or Inf reaches the norm through the sum of squares
    whatever its order. Where every norm is finite, so is every entry; else (a NaN or Inf, or a
    finite tensor whose norm overflows) each tensor is checked exactly: correct, only slower. (A
    float16 gradient's norm is float16: above 65504 it alarms on every step.) Tensors on several
    devices are checked one by one. The flags come back on the CPU: one host read (one more on an alarm).
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    device = tensors[0].device
    if not all(t.device == device for t in tensors):
        return torch.stack([all_finite(t).cpu() for t in tensors])
    if bool((torch.stack(torch._foreach_norm(list(tensors))) < math.inf).all()):  # NaN, inf: False
        return torch.ones(len(tensors), dtype=torch.bool)
    return torch.stack([all_finite(t) for t in tensors]).cpu()


def is_finite(t: Tensor) -> bool:
    """:func:`all_finite` read on the host (one synchronisation on an accelerator).

    On CPU ``max |t_ij|`` is read as a Python float: a step makes two such checks per matrix, and the
    0-d ``torch.isfinite`` ops of :func:`all_finite` cost more dispatch there than the read.
    """
    if not host_path(t.device) or t.numel() == 0:
        return bool(all_finite(t))
    return math.isfinite(abs_max(t))


def matrix_shape(shape: Sequence[int], batch_3d: bool = True) -> tuple[int, int, int]:
    """The ``(B, m, n)`` matrix-batch shape of a parameter of ``shape`` (see :func:`matrix_view`)."""
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    if len(shape) == 3 and batch_3d:
        return (shape[0], shape[1], shape[2])
    return (1, shape[0], math.prod(shape[1:]))


def matrix_view(t: Tensor, batch_3d: bool = True) -> Tensor:
    """View a parameter-shaped tensor as a batch of matrices ``(B, m, n)``.

    2-D: one matrix. 3-D: a batch of stacked matrices (``batch_3d=True``) or a Conv1d kernel
    flattened to ``out x (in * k)``. 4-D and more: a conv kernel flattened to ``out x (in * kh * kw)``.
    Flattening keeps the first dimension as the rows: a transposed convolution's weight is
    ``(in, out / groups, *k)``, so its rows are its input channels (``in x (out / groups * kh * kw)``),
    and :func:`lr_scale` and NorMuon's per-row statistics read it so.
    """
    return t.reshape(matrix_shape(t.shape, batch_3d))


def second_moment_shape(mshape: tuple[int, int, int], plugin: str) -> tuple[int, int, int]:
    """Shape of the NorMuon (one entry per row) or AdaMuon (element-wise) second moment."""
    return (mshape[0], mshape[1], 1) if plugin == "normuon" else mshape


def lr_scale(m: int, n: int, rule: str) -> float:
    """Per-matrix learning-rate multiplier for an ``m x n`` matrix (rows x columns of
    :func:`matrix_view`: out x in for ``nn.Linear`` and conv weights)."""
    if rule == "muon":  # Muon's: sqrt(max(1, m / n))
        return math.sqrt(max(1.0, m / n))
    if rule == "adamw_rms":  # Moonshot's "match AdamW RMS": 0.2 sqrt(max(m, n))
        return 0.2 * math.sqrt(max(m, n))
    return 1.0


def is_corrected(step: int, interval: int) -> bool:
    """The interval schedule: the correction runs on steps k, 2k, 3k, ... (``step`` counts from 1), as
    in the paper's code (``step_idx += 1; use_generalized = step_idx % interval == 0``); plain Muon
    steps in between. (Before session 19: steps 1, 1 + k, 1 + 2k, ...)"""
    return interval == 1 or step % interval == 0


# --------------------------------------------------------------------------------------------
# Momentum, spectral map, plug-in, update
# --------------------------------------------------------------------------------------------


def momentum_direction(
    grad: Tensor, buf: Tensor, beta: float, nesterov: bool, out: Tensor | None = None
) -> Tensor:
    r"""``N_t`` from the momentum *before* this step, out of place (``buf`` is not changed).

    .. math:: M_t = \beta M_{t-1} + (1 - \beta) G_t, \qquad N_t = (1 - \beta) G_t + \beta M_t

    (``N_t = M_t`` without Nesterov.) :func:`commit_momentum_` later stores the same ``M_t`` bit for bit.
    ``out`` (a tensor of ``buf``'s shape and dtype) receives ``M_t`` and then ``N_t``, in place, instead
    of two fresh allocations: on CPU a fresh allocation costs more than the ``lerp`` itself (new pages
    are faulted in: an out-of-place ``lerp`` measured ~3x an in-place one inside a step). Same bits.
    """
    if out is None:
        new = buf.lerp(grad, 1.0 - beta)
        return grad.lerp(new, beta) if nesterov else new
    torch.lerp(buf, grad, 1.0 - beta, out=out)
    return torch.lerp(grad, out, beta, out=out) if nesterov else out


def stacked_momentum_directions(
    grads: Sequence[Tensor], bufs: Sequence[Tensor], beta: float, nesterov: bool, batch_3d: bool = True
) -> Tensor:
    """:func:`momentum_direction` of same-shape matrices as one ``(sum B, m, n)`` stack (the input of one
    backend call), in four operators whatever the number of matrices.

    The buffers and the gradients are each stacked once (one copy kernel each), then the two lerps of
    :func:`momentum_direction` run on the stacks: ``M = stack(bufs).lerp_(stack(grads), 1 - beta)`` and
    ``N = stack(grads).lerp_(M, beta)``. Per matrix that was four operators (a slice, a view, two
    lerps), the launches that bound the step on a GPU (BENCHMARKS.md §A-7, §A-10). Same elementwise
    lerps, so the same bits as stacking the out-of-place :func:`momentum_direction` of each. One of
    the two stacks is transient (with Nesterov the gradients' stack becomes ``N`` and the buffers' is
    freed; without, the other way round), and while both are alive the chunk's spectral map has not
    started (its workspace is larger, :func:`chunk_work_bytes`). Flattened conv kernels (4-D, or 3-D
    with ``batch_3d=False``) take one view each on the way in.
    The stack has the first buffer's dtype and the first gradient's device; every item must view as
    the same ``(m, n)``.
    """
    shapes = [matrix_shape(g.shape, batch_3d) for g in grads]
    m, n = shapes[0][1:]
    if any(s[1:] != (m, n) for s in shapes):
        raise ValueError(f"stacked_momentum_directions needs same-shape matrices, got {sorted(set(shapes))}")
    M = _stack_matrices(bufs, shapes)
    G = _stack_matrices(grads, shapes)
    M.lerp_(G, 1.0 - beta)
    if not nesterov:
        return M
    return G.lerp_(M, beta)


def _stack_matrices(ts: Sequence[Tensor], shapes: Sequence[tuple[int, int, int]]) -> Tensor:
    """The ``(sum B, m, n)`` stack of parameter-shaped tensors, in one copy (2-D items and 3-D batches need
    no views)."""
    m, n = shapes[0][1:]
    if all(t.shape == (m, n) for t in ts):
        return torch.stack(list(ts))
    if all(t.shape == s for t, s in zip(ts, shapes)):  # 3-D batches (batch_3d)
        return torch.cat(list(ts))
    return torch.cat([t.reshape(s) for t, s in zip(ts, shapes)])  # flattened conv kernels: a view each


def commit_momentum_(buf: Tensor, grad: Tensor, beta: float) -> None:
    """``buf <- beta buf + (1 - beta) grad`` in place (the ``M_t`` of :func:`momentum_direction`)."""
    buf.lerp_(grad, 1.0 - beta)


def commit_momenta_(bufs: list[Tensor], grads: list[Tensor], beta: float) -> None:
    """:func:`commit_momentum_` of many buffers in one ``torch._foreach_lerp_``: on CUDA a few
    multi-tensor kernels instead of one launch per buffer; the same lerp, elementwise."""
    torch._foreach_lerp_(bufs, grads, 1.0 - beta)


def direction(mats: Tensor, group: dict[str, Any], corrected: bool) -> Tensor:
    """The spectral map on a stack of same-shape matrices ``(B, m, n)``, in the backend's working dtype.

    ``corrected=False`` (an in-between step of ``interval``): Muon's Newton--Schulz polar factor.
    A bfloat16 (or float16) result is kept as it is, as ``torch.optim.Muon`` keeps its update: adding
    it to a float32 parameter upcasts it exactly inside the add (:func:`decoupled_update_`), so an
    upcast copy here would cost a pass over the matrices and change no bit.
    """
    if not corrected:
        out = polar(mats, steps=group["ns_steps"], dtype=group["ns_dtype"])
    else:
        method = resolve_method(group["method"], group["spectrum"], mats.device)
        options = {k: group[k] for k in BACKENDS[method].options}  # what the backend declares
        out = spectral_map(
            mats,
            float(group["p"]),
            method=method,
            spectrum=group["spectrum"],
            scale=group["scale"],
            **options,
        )
    return out


def exact_direction(mats: Tensor, group: dict[str, Any], corrected: bool) -> Tensor:
    """The float64 SVD rule for the same map (the fallback when a fast backend fails on finite input).

    The SVD runs in float64 on the batch as it is (not on a float64 copy), so singular values at the
    rounding level of a float32 batch are zeroed as the exact backends zero them
    (:func:`htmuon.spectral._input_floor`): a low-rank float32 momentum gains no directions from its
    rounding. (A 16-bit batch gets the float32 floor too, as in the exact backends, so its own coarser
    rounding is lifted as they lift it.)
    An uncorrected step (``interval``) gets the polar factor ``U V^T`` itself (unit singular values on
    the batch's rank, as Muon's), not rescaled to ``scale``.
    """
    p = float(group["p"]) if corrected else 0.0
    spectrum = group["spectrum"] if corrected else "power"
    scale = group["scale"] if corrected else "raw"  # p = 0, raw: U V^T, unit singular values
    out = spectral_map(mats, p, method="svd", spectrum=spectrum, scale=scale, compute_dtype=torch.float64)
    return out if mats.dtype == torch.float64 else out.float()


def safe_direction(mats: Tensor, group: dict[str, Any], corrected: bool, check: bool = True) -> Tensor:
    """:func:`direction`, replaced by :func:`exact_direction` if the backend raises ``LinAlgError`` or
    (with ``check``) returns NaN/Inf on finite input; refuses non-finite input.

    Per matrix of a ``(B, m, n)`` batch: the matrices whose result is not finite are computed again
    alone (then replaced if they fail alone), and a batch whose backend raised is computed one matrix
    at a time, so that each matrix gets what it gets alone whatever it is batched with (the result
    then has the widest dtype of its parts, a bfloat16 one upcast exactly).

    Raises:
        NonFiniteGradientError: ``mats`` itself holds NaN/Inf (a corrupted momentum buffer, or a finite
            buffer and gradient near the dtype's range whose momentum update overflowed).
        RuntimeError: the exact rule fails too.
    """
    if no_host_reads(mats):  # compiled: the step masks on isfinite instead; meta: no values to check
        return direction(mats, group, corrected)
    try:
        out = direction(mats, group, corrected)
        reason = "returned NaN or Inf"
    except torch.linalg.LinAlgError as exc:
        out, reason = None, f"raised {exc}"
    if out is not None and (not check or is_finite(out)):
        return out
    if not is_finite(mats):
        raise NonFiniteGradientError(
            f"non-finite momentum direction (NaN or Inf) in a {tuple(mats.shape)} matrix batch: the "
            "momentum with this gradient (the updated buffer, or its Nesterov blend) holds NaN/Inf: a "
            "corrupted buffer, or finite values near the dtype's range that overflowed; the step was refused"
        )
    if mats.ndim == 3 and mats.size(0) > 1:
        # Per matrix: only the matrices that fail get the exact rule, so that a matrix's direction does
        # not depend on the neighbours it is batched with (a 3-D parameter's stack; on accelerators a
        # chunk, which a DDP / FSDP2 owner holds only its own share of). A backend that raised for the
        # batch: each matrix alone.
        if out is None:
            parts = [safe_direction(x, group, corrected, check) for x in mats.split(1)]
        else:
            ok = torch.isfinite(out).flatten(1).all(1).tolist()
            parts = [
                out[i : i + 1] if fine else safe_direction(mats[i : i + 1], group, corrected, check)
                for i, fine in enumerate(ok)
            ]
        wide = functools.reduce(torch.promote_types, [x.dtype for x in parts])
        if all(not x.is_contiguous() and x.mT.is_contiguous() for x in parts):  # a tall batch's view
            return torch.cat([x.mT.to(wide) for x in parts]).mT  # keeps it (the plug-in reads the layout)
        return torch.cat([x.to(wide) for x in parts])
    method = group["method"] if corrected else "ns (polar)"
    warnings.warn(
        f"spectral backend {method!r} {reason} on a finite {tuple(mats.shape)} matrix batch; "
        "used the exact float64 SVD rule for it instead",
        RuntimeWarning,
        stacklevel=3,
    )
    out = exact_direction(mats, group, corrected)
    if not is_finite(out):
        raise RuntimeError(
            f"the exact float64 SVD rule returned NaN or Inf on a finite {tuple(mats.shape)} matrix batch"
        )
    return out


def compute_directions(mats: list[Tensor], corrected: list[bool], group: dict[str, Any]) -> list[Tensor]:
    """:func:`safe_direction` of every ``(B, m, n)`` item, batching items of equal shape, dtype and schedule.

    Returns the directions in the backends' working dtypes (bfloat16 for the Newton--Schulz backends
    where bfloat16 matmuls are fast; float32 or float64 otherwise), one per item, in order. The caller
    decides how many items to pass at once (:func:`plan_step`). On CPU (eager) the items are not
    stacked: the backends there take one 2-D product per matrix anyway (see :func:`htmuon.spectral.gram`),
    so stacking would only add a copy of the chunk.
    """
    check = bool(group["check_finite"])
    if mats and not stacks_matrices(mats[0].device):
        return [safe_direction(x, group, c, check) for x, c in zip(mats, corrected)]
    buckets: dict[tuple, list[int]] = {}
    for i, (x, c) in enumerate(zip(mats, corrected)):
        buckets.setdefault((tuple(x.shape[-2:]), x.dtype, x.device, c), []).append(i)
    out: list[Tensor | None] = [None] * len(mats)
    for (_, _, _, c), idx in buckets.items():
        stack = mats[idx[0]] if len(idx) == 1 else torch.cat([mats[i] for i in idx])
        result = safe_direction(stack, group, c, check)
        del stack
        for i, part in zip(idx, result.split([mats[i].size(0) for i in idx])):
            out[i] = part
    return out  # type: ignore[return-value]


def stacks_matrices(device: torch.device) -> bool:
    """Whether :func:`compute_directions` stacks same-shape matrices into one backend call on ``device``:
    everywhere but on the CPU paths (:func:`htmuon.spectral.host_path`: there every backend loops over
    the matrices itself)."""
    return not host_path(device)


def plugin_input_(N: Tensor, plugin: str | None) -> Tensor:
    """What the spectral map receives under ``plugin``: AdaMuon orthogonalises the *sign* of the
    momentum direction (Si et al., AdaMuon, Algorithm 1: ``O = NS(sign(M))``), so ``N`` becomes its
    sign, in place (``N`` is the step's own scratch copy); NorMuon and no plug-in take ``N`` as it is."""
    return N.sign_() if plugin == "adamuon" else N


def second_moment_normalize(
    O: Tensor, v: Tensor, beta2: float, eps: float, kind: str
) -> tuple[Tensor, Tensor]:
    r"""The NorMuon / AdaMuon plug-in on a direction ``O`` of shape ``(B, m, n)``, out of place.

    ``normuon`` (Li et al.): ``v' = beta2 v + (1 - beta2) mean_row(O^2)`` (one entry per output neuron,
    i.e. per row), ``O' = O / sqrt(v' + eps)`` rescaled to keep ``||O||_F``.

    ``adamuon`` (Si et al.; ``O`` is the map of ``sign(N_t)``, see :func:`plugin_input_`): the same
    EMA element-wise, then ``O'`` rescaled to the Frobenius norm ``sqrt(min(m, n))`` of an exact
    polar factor, so that with ``lr_adjust="adamw_rms"`` (``0.2 sqrt(max(m, n))``) the step is
    AdaMuon's ``0.2 sqrt(m n) O' / ||O'||_F``.

    Against the cited algorithms: neither has a bias correction here, as in both papers (AdaMuon's
    code divides ``v`` by ``1 - beta2^t``: a uniform factor, which the final rescaling removes; it
    amounts to ``eps (1 - beta2^t)`` in place of ``eps``). ``eps`` sits inside the root,
    ``sqrt(v' + eps)`` (the HTMuon paper's plug-in); Li et al.'s and Si et al.'s code add it outside,
    ``sqrt(v') + eps``. The two differ only where ``v'`` is within a few decades of ``eps`` (entries of
    ``O`` of ~1e-5 at the default 1e-10: a raw-scale direction of a tiny gradient), where this form
    normalises less instead of lifting those entries towards the others. NorMuon's Frobenius-preserving
    rescaling and the shape scaling after it follow Li et al.'s code. The group's ``beta2`` (0.95) is
    NorMuon's; AdaMuon's code defaults to 0.999.

    Returns:
        ``(O', v')``; ``v`` itself is not changed (store ``v'`` with ``v.copy_(v')``).
    """
    if O.dtype not in (torch.float32, torch.float64):  # statistics of a bfloat16 direction in float32
        O = O.float()
    sq = O.square()
    stat = sq.mean(dim=-1, keepdim=True) if kind == "normuon" else sq
    v_new = v.lerp(stat.to(v.dtype), 1.0 - beta2)
    normalized = O / (v_new.to(O.dtype) + eps).sqrt()
    if kind == "normuon":
        target = sq.sum(dim=(-2, -1), keepdim=True).sqrt()
    else:
        target = math.sqrt(min(O.shape[-2:]))
    # a zero direction (AdaMuon's sign of an all-zero momentum: a zero gradient at the first step)
    # stays zero: target / tiny overflows to inf for min(m, n) >= 16, and 0 * inf is NaN
    norm = normalized.norm(dim=(-2, -1), keepdim=True)
    ratio = torch.where(norm > 0, target / norm.clamp_min(torch.finfo(O.dtype).tiny), 0.0)
    return normalized * ratio, v_new


def decoupled_update_(param: Tensor, O: Tensor, lr: float, wd: float, scale: float) -> None:
    """``param <- (1 - lr wd) param - lr scale O`` in place (decoupled weight decay, then the step).

    ``O`` may have a lower precision than ``param`` (a bfloat16 direction for a float32 parameter, as
    in ``torch.optim.Muon``): the add upcasts it exactly. A wider ``O`` is rounded to ``param``'s
    dtype first. bfloat16 and float16 parameters on CPU: see :func:`_add_step_`.
    """
    O = _update_operand(O, param)
    if wd != 0.0:
        param.mul_(1.0 - lr * wd)
    _add_step_(param, O, -lr * scale)


def _add_step_(param: Tensor, O: Tensor, alpha: float) -> None:
    """``param <- param + alpha O`` in place.

    bfloat16 and float16 parameters on CPU: the step ``alpha O`` is formed in float32 and added to the
    parameter in one rounding. There ``add_(O, alpha=alpha)`` rounds ``alpha`` to the parameter's dtype
    in its vectorised loop but not in the scalar loop that takes a tensor's last few entries (or a
    strided one), so an entry's bits depended on where it sat in the tensor: an FSDP2 shard (or an
    owner's whole matrix against a strided view) got other bits than the single process for the same
    direction (torch 2.13; ``alpha`` 0.0212 became 0.021240234 in bfloat16). The float32 step is the
    same whatever the layout."""
    if _rounds_scalars(param):
        param.add_(O.to(torch.float32, copy=True).mul_(alpha))
    else:
        param.add_(O, alpha=alpha)


def _update_operand(O: Tensor, param: Tensor) -> Tensor:
    """``O`` as the update adds it to ``param``: a narrower direction as it is (upcast inside the add,
    exactly), one of another dtype at least as wide rounded to ``param``'s dtype first."""
    if O.dtype != param.dtype and torch.finfo(O.dtype).bits >= torch.finfo(param.dtype).bits:
        return O.to(param.dtype)
    return O


#: Dtypes whose CPU ``torch._foreach_mul_`` by a Python number, and ``add_``'s vectorised loop its
#: ``alpha``, round the number first (see :func:`decoupled_updates_`, :func:`_add_step_`).
_ROUNDED_SCALAR_DTYPES = (torch.bfloat16, torch.float16)


def _rounds_scalars(param: Tensor) -> bool:
    """A CPU parameter of a :data:`_ROUNDED_SCALAR_DTYPES` dtype: its updates take the float32 route."""
    return param.device.type == "cpu" and param.dtype in _ROUNDED_SCALAR_DTYPES


def decoupled_updates_(
    params: list[Tensor], directions: list[Tensor], lr: float, wd: float, scales: list[float]
) -> None:
    """:func:`decoupled_update_` of many parameters: the weight decay of all in one
    ``torch._foreach_mul_``, then the steps in one ``torch._foreach_add_`` per lr scale (one Python
    call, and on CUDA a few multi-tensor kernels where the dtypes agree, instead of one launch each).
    A bfloat16 direction of a float32 parameter is upcast inside the add, as in :func:`decoupled_update_`
    (same bits: where dtypes differ, the foreach call runs each tensor's own ``add_``).
    ``directions[i]`` has ``params[i]``'s shape.

    bfloat16 and float16 parameters on CPU take their weight decay one ``mul_`` each: there
    ``torch._foreach_mul_`` by a Python number first rounds the number to the list's dtype (1 - 0.002
    becomes 0.99609375 in bfloat16, twice the decay asked for; torch 2.13), where ``mul_`` multiplies
    in float32 and rounds once; and their steps one :func:`_add_step_` each, for the same reason.
    (CUDA's foreach kernels compute in float32 by design; not checked on a GPU in this project.)"""
    if wd != 0.0:
        factor, rest = 1.0 - lr * wd, []
        for p in params:
            if _rounds_scalars(p):
                p.mul_(factor)
            else:
                rest.append(p)
        if rest:
            torch._foreach_mul_(rest, factor)
    by_scale: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for param, O, scale in zip(params, directions, scales):
        if _rounds_scalars(param):
            _add_step_(param, _update_operand(O, param), -lr * float(scale))  # see _add_step_
            continue
        ps, os = by_scale.setdefault(float(scale), ([], []))
        ps.append(param)
        os.append(_update_operand(O, param))
    for scale, (ps, os) in by_scale.items():
        torch._foreach_add_(ps, os, alpha=-lr * scale)


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """The AdamW part: torch's own functional AdamW (``torch.optim.adamw.adamw``; foreach / fused where
    torch picks or is told), so the numbers are ``torch.optim.AdamW``'s with the same hyperparameters.

    float16 parameters (unless ``fused``) are updated in float32, their state kept in float16, as
    torch's fused kernel does: torch's foreach and for-loop kernels compute in float16, where ``eps``
    (torch's 1e-8, the AdamW part's 1e-10) and the square of a gradient below ~1e-3 round to 0, and
    the update is inf or NaN (``torch.optim.AdamW`` on a float16 parameter whose gradient is 1e-4 sets
    it to -inf). The float32 copies are transient: four tensors (parameter, gradient, both moments) of
    twice the float16 parameters' bytes each.
    """
    from torch.optim.adamw import adamw as torch_adamw

    half = [] if fused else [i for i, p in enumerate(params) if p.dtype == torch.float16]
    if half:
        hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
        up = [[t[i].float() for i in half] for t in (params, grads, exp_avgs, exp_avg_sqs)]
        adamw(*up, [steps[i] for i in half], **hyper)
        for dst, src in zip((params, exp_avgs, exp_avg_sqs), (up[0], up[2], up[3])):
            for i, value in zip(half, src):
                dst[i].copy_(value)
        if len(half) == len(params):
            return
        rest = [i for i, p in enumerate(params) if p.dtype != torch.float16]  # (not a set per index)
        params, grads, exp_avgs, exp_avg_sqs, steps = (
            [t[i] for i in rest] for t in (params, grads, exp_avgs, exp_avg_sqs, steps)
        )
    torch_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=foreach,
        fused=fused,
        amsgrad=False,
        beta1=betas[0],
        beta2=betas[1],
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
        capturable=False,
        differentiable=False,
        has_complex=False,
    )


def adamw_masked(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    ok: Tensor,
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    r"""AdamW as :func:`adamw` computes it, applied only where the bool tensor ``ok`` is ``True``.

    For compiled steps (``torch.compile(opt.step)``): a non-finite step is skipped on the device,
    without the host reading a flag (a graph break), which torch's own kernels only offer in the
    fused variant (which the compiler does not trace). Same math, rounding may differ by an ulp.
    """
    beta1, beta2 = betas
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        # float16 in float32, as adamw computes it (in float16 eps and small squares round to 0)
        P, G, M, V = (x.float() for x in (p, g, m, v)) if p.dtype == torch.float16 else (p, g, m, v)
        t.add_(ok.to(t.dtype))
        M = torch.where(ok, M.lerp(G, 1.0 - beta1), M)
        V = torch.where(ok, V * beta2 + (1.0 - beta2) * G * G, V)
        bias1 = 1.0 - beta1**t
        bias2_sqrt = (1.0 - beta2**t).sqrt()
        update = M / (V.sqrt() / bias2_sqrt + eps) * (lr / bias1)
        P = torch.where(ok, P * (1.0 - lr * weight_decay) - update, P)
        m.copy_(M)
        v.copy_(V)
        p.copy_(P)


# --------------------------------------------------------------------------------------------
# The memory plan
# --------------------------------------------------------------------------------------------


def partial_step_error(exc: BaseException, applied: int, chunk_bytes: int | str) -> BaseException:
    """An error of ``exc``'s type that says ``applied`` parameters were already updated (raised from ``exc``).

    A step applies param group by param group, and within a group window by window when its
    directions do not fit one ``chunk_bytes`` window, so an unexpected error in a later group or
    window leaves the earlier ones applied; the message says so.
    """
    budget = (
        f"chunk_bytes='auto' ({DEFAULT_CHUNK_BYTES >> 20} MiB on CPU, {ACCELERATOR_CHUNK_BYTES >> 20} MiB on "
        "accelerators)"
        if chunk_bytes == "auto"
        else f"chunk_bytes={chunk_bytes}"
    )
    note = (
        f"[{applied} parameter(s) were already updated by this step before the failure: the step "
        f"applies each param group, and each window of {budget}, in turn]"
    )
    try:
        return type(exc)(f"{exc} {note}")
    except Exception:  # an exception type whose constructor takes other arguments
        return RuntimeError(f"{exc!r} {note}")


def chunk_work_bytes(
    mshape: tuple[int, int, int], itemsize: int = 4, work_itemsize: int | None = None
) -> tuple[int, int]:
    """``(work, held)`` bytes of the spectral map on one ``(B, m, n)`` item.

    ``work``: transient while its chunk is computed (the stacked ``N_t`` and the backend workspace);
    ``held``: the direction kept until its window is applied.

    ``work_itemsize=None`` (exact backends, plug-ins, anything not modelled below): an upper estimate
    for every backend, :data:`WORKSPACE_MN` / :data:`WORKSPACE_KK` in float32 (float64 for float64
    parameters), the direction held in float32. ``work_itemsize`` given (the bytes of a matmul-only
    map's working dtype: ``fast``, ``fast5``, the polar factor of ``interval``'s in-between steps; see
    :func:`work_itemsize`): the stacked ``N_t`` in the parameters' dtype plus the largest of the
    map's three stages, each an upper bound of what the profiler measures on CPU (BENCHMARKS.md
    §A-11): the prescale (a float32 temporary on CPU and the working copy), the normalisation
    (the working copy and the ``k x k`` matrices, in float32 where they are summed) and an iteration
    (two iterates besides the output sum, and three ``k x k`` matrices); the direction (the output
    sum) held in the working dtype.

    Example:
        >>> [x // 2**20 for x in chunk_work_bytes((1, 768, 2048))]  # float32, any backend
        [39, 6]
        >>> [x // 2**20 for x in chunk_work_bytes((1, 768, 2048), 4, work_itemsize=2)]  # bfloat16 work
        [15, 3]
    """
    b, m, n = mshape
    k = min(m, n)
    mn, kk = m * n, k * k
    if work_itemsize is None:
        elem = max(itemsize, 4)
        held = b * mn * elem
        work = b * (mn * itemsize + (WORKSPACE_MN * mn + WORKSPACE_KK * kk) * elem)
        return work, held
    w = work_itemsize
    acc = max(w, 4)  # the float32 (float64) accumulation of the small matrices
    stage = max(
        mn * (max(itemsize, acc) + w),  # the prescale: the working copy (and on CPU a float32 temporary)
        mn * w + kk * (2 * acc + w),  # the normalisation: the working copy and the k x k matrices
        mn * 2 * w + kk * 3 * w,  # a step: two iterates and three k x k matrices
    )
    return b * (mn * itemsize + stage), b * mn * w


#: Backends whose work :func:`chunk_work_bytes` models from their working dtype (matrix products on a
#: few iterates of that dtype); every other backend is planned with the upper estimate.
MATMUL_BACKENDS = ("fast", "fast5")


def work_itemsize(group: dict[str, Any], corrected: bool, param: Tensor) -> int | None:
    """Bytes per element of the working dtype of ``param``'s spectral map, where :func:`chunk_work_bytes`
    models it (``fast``, ``fast5``; ``interval``'s in-between polar steps), else ``None``.

    Modelled for float32 parameters only, and only where :func:`htmuon.spectral.spectral_map` hands
    the batch to the backend as it is (its raw scale cannot overflow: ``p`` up to about 0.9). Elsewhere
    the map adds a prescaled copy of the chunk in the parameters' dtype and returns the direction in
    that dtype (float64 parameters, ``p`` near 1), or on CPU the prescale makes two float32 temporaries
    of a bfloat16 or float16 chunk: a review measured up to 2.5x the model there. ``None`` also with a
    plug-in or ``scale="muon_rms"`` (a copy of each direction).
    """
    if group["plugin"] is not None or group["scale"] != "raw" or param.dtype != torch.float32:
        return None
    if corrected:
        method = resolve_method(group["method"], group["spectrum"], param.device)
        m, n = matrix_shape(param.shape, group["batch_3d"])[1:]
        if method not in MATMUL_BACKENDS or not _raw_scale_is_bounded(float(group["p"]), param.dtype, m, n):
            return None
        dtype = group.get("compute_dtype") or ns_working_dtype(group["ns_dtype"], param.device)
    else:
        dtype = ns_working_dtype(group["ns_dtype"], param.device)
    return (dtype or param.dtype).itemsize


@dataclass(frozen=True)
class StepPlan:
    """How a step walks its matrices: ``windows[w][c]`` is a chunk, a list of item indices of one bucket.

    Every chunk of a window is computed (nothing changed yet), then the whole window is applied.
    ``peak_bytes`` is the largest transient total the plan reaches (see :func:`plan_step`).
    """

    windows: tuple[tuple[tuple[int, ...], ...], ...]
    peak_bytes: int


def plan_step(
    keys: Sequence[Any],
    mshapes: Sequence[tuple[int, int, int]],
    itemsizes: Sequence[int],
    budget: int,
    work_itemsizes: Sequence[int | None] | None = None,
) -> StepPlan:
    """Cut a step's matrices into same-shape chunks and windows within ``budget`` bytes.

    Items with equal ``keys`` (shape, dtype, device, group, schedule) form a bucket, in order of first
    appearance; a bucket is cut into chunks of consecutive items whose work + held bytes fit the
    budget (at least one item each), and consecutive chunks share a window while the held
    directions of the window so far plus the next chunk's work and held bytes fit the budget. So
    the transient peak is ``max(budget, the largest single item)``, whatever the depth of the model.

    Args:
        keys: a hashable bucket key per item.
        mshapes: the ``(B, m, n)`` shape per item.
        itemsizes: bytes per element of the item's dtype (its parameter's).
        budget: bytes (``chunk_bytes``).
        work_itemsizes: per item, :func:`work_itemsize` (``None``: the upper estimate of
            :func:`chunk_work_bytes`, as for all items when not given).

    Returns:
        A :class:`StepPlan`.

    Example:
        >>> plan_step(["a"] * 3, [(1, 512, 512)] * 3, [4] * 3, 2**40).windows
        (((0, 1, 2),),)
    """
    buckets: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        buckets.setdefault(key, []).append(i)
    work_itemsizes = [None] * len(mshapes) if work_itemsizes is None else work_itemsizes
    costs = [chunk_work_bytes(s, z, w) for s, z, w in zip(mshapes, itemsizes, work_itemsizes)]
    chunks: list[tuple[list[int], int, int]] = []  # (items, work, held)
    for idx in buckets.values():
        cur: list[int] = []
        work = held = 0
        for i in idx:
            w, h = costs[i]
            if cur and work + w + held + h > budget:
                chunks.append((cur, work, held))
                cur, work, held = [], 0, 0
            cur.append(i)
            work += w
            held += h
        if cur:
            chunks.append((cur, work, held))
    windows: list[list[tuple[int, ...]]] = []
    held_so_far, peak = 0, 0
    for items, work, held in chunks:
        if windows and held_so_far + work + held > budget:
            held_so_far = 0
            windows.append([])
        if not windows:
            windows.append([])
        windows[-1].append(tuple(items))
        peak = max(peak, held_so_far + work + held)
        held_so_far += held
    return StepPlan(tuple(tuple(w) for w in windows), peak)
