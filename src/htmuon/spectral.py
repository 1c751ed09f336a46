"""Pure spectral maps on ``(..., m, n)`` tensors.

The heavy-tailed spectral correction of HTMuon replaces a matrix ``G = U diag(s) V^T``
by ``U diag(s**p) V^T``. This module holds that map and its building blocks as pure
functions with no optimizer state:

* :func:`polar` -- Muon's Newton--Schulz polar factor (``p = 0``), bit-compatible with
  :class:`torch.optim.Muon`'s iteration.
* :func:`spectral_power` -- ``U diag(w(s)) V^T`` for ``w(s) = s**p`` (``spectrum="power"``) or
  the paper's fixed rank spectrum ``w_i = i**-p`` (``spectrum="rank"``), by one of several
  backends, optionally rescaled to Muon's update RMS (``scale="muon_rms"``).

Backends are one function each, registered by name in :data:`BACKENDS`; :func:`spectral_power`
is the one dispatch point. Every backend receives a *wide* batch ``(B, m, n)`` with ``m <= n``
(the dispatch transposes tall matrices), so Gram matrices are always the small ``m x m`` side.

References:
    Pang et al., "HTMuon: Improving Muon via Heavy-Tailed Spectral Correction", arXiv 2603.10067.
    K. Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024), for the quintic
    Newton--Schulz coefficients.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "Capability",
    "MUON_NS5_COEFFICIENTS",
    "Backend",
    "decide",
    "device_capability",
    "accelerator_paths",
    "host_path",
    "ns_working_dtype",
    "polar",
    "register_backend",
    "resolve_method",
    "spectral_power",
    "spectrum_weights",
]

#: Muon's quintic Newton--Schulz coefficients (a, b, c), tuned to maximise the slope at zero.
#: Source: K. Jordan's Muon (2024), the same constants as ``torch.optim.Muon``.
MUON_NS5_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
#: Number of Newton--Schulz steps in Muon.
MUON_NS_STEPS = 5
#: Floor for the Frobenius normalisation in Newton--Schulz (as in ``torch.optim.Muon``).
NS_EPS = 1e-7
#: Iterations of the coupled Newton--Schulz square root per nested root in the ``"ns"`` backend
#: (the paper's setting: 5 iterations per root).
NS_ROOT_ITERS = 5
#: Deepest nested square root the ``"ns"`` backend uses to expand ``p / 2`` in binary: the
#: exponent is then exact to ``2**-NS_MAX_ROOTS``.
NS_MAX_ROOTS = 10

#: The ``"eigh"`` backend forms its float32 result as ``(Q diag(w/s) Q^T) X`` while the relative error
#: this adds (``eps_fp32 * max(w/s) * s_max / max(w)``) stays below this; above, ``Q^T X`` is taken in
#: the working dtype (float64) first (one more ``m x m x n`` float64 product).
EIGH_FP32_PRODUCT_LIMIT = 1e-4

SPECTRA = ("power", "rank")
SCALES = ("raw", "muon_rms")


@dataclass(frozen=True)
class Backend:
    """A spectral backend: ``fn(X, p, spectrum, **options) -> U diag(w) V^T``.

    ``X`` is a wide batch ``(B, m, n)``, ``m <= n``; the result has X's shape and is
    computed in the backend's working precision (the caller casts it back). ``options`` names the
    keyword options ``fn`` accepts among :data:`BACKEND_OPTIONS`; :class:`htmuon.HTMuon` passes
    exactly those from the parameter group.

    ``scale_safe=False`` (the default): :func:`spectral_power` hands ``fn`` a copy of the batch
    rescaled by a power of two to ``max |X_ij|`` in [1/2, 1) per matrix (exact), and restores the raw
    scale ``2^(e p)`` itself, so ``fn`` never sees extreme magnitudes. ``scale_safe=True``: ``fn``
    takes any finite ``X`` and returns the raw-scale result without over- or underflow in float32
    (the dispatch then skips that extra pass, unless the result could exceed the output dtype).
    """

    name: str
    fn: Callable[..., Tensor]
    spectra: tuple[str, ...]
    description: str
    options: tuple[str, ...] = ()
    scale_safe: bool = False


BACKENDS: dict[str, Backend] = {}
#: The per-group HTMuon options a backend may declare (same names as HTMuon's keywords).
BACKEND_OPTIONS = ("compute_dtype", "ns_dtype", "ns_steps")


def register_backend(
    name: str,
    fn: Callable[..., Tensor],
    *,
    spectra: tuple[str, ...] = ("power",),
    description: str = "",
    options: tuple[str, ...] = (),
    replace: bool = False,
    scale_safe: bool = False,
) -> None:
    """Register a spectral backend under ``name`` (see :class:`Backend` for the signature,
    ``options`` (which of :data:`BACKEND_OPTIONS` ``fn`` takes as keywords) and ``scale_safe``)."""
    if name in BACKENDS and not replace:
        raise ValueError(f"spectral backend {name!r} is already registered")
    unknown = set(spectra) - set(SPECTRA)
    if unknown:
        raise ValueError(f"unknown spectra {sorted(unknown)} for backend {name!r}; valid: {SPECTRA}")
    bad = set(options) - set(BACKEND_OPTIONS)
    if bad:
        raise ValueError(f"unknown options {sorted(bad)} for backend {name!r}; valid: {BACKEND_OPTIONS}")
    BACKENDS[name] = Backend(name, fn, tuple(spectra), description, tuple(options), scale_safe)


# --------------------------------------------------------------------------------------------
# Which code path: CPU (eager) or the batched, sync-free one of accelerators and compiled steps
# --------------------------------------------------------------------------------------------

_SIMULATED_ACCELERATOR = False


def host_path(device: torch.device) -> bool:
    """Whether the CPU code paths run on ``device``: one 2-D product per matrix, scalars read on the
    host, checks that skip a pass. Elsewhere -- accelerators, compiled steps, and CPU inside
    :func:`accelerator_paths` -- the batched paths: stacked same-shape matrices, per-matrix factors
    kept as tensors, and in the Newton--Schulz backends no host read but the step's finite checks
    (``eigh`` still reads its eigenvalue check and its product-precision choice).

    Every choice of code path in the library goes through this one function. What is chosen by the
    device type itself -- the ``chunk_bytes="auto"`` budget, ``method="auto"`` and the working dtype --
    is not: inside :func:`accelerator_paths` a CPU keeps its own (pass a GPU's budget explicitly).
    """
    return device.type == "cpu" and not _SIMULATED_ACCELERATOR and not torch.compiler.is_compiling()


@contextlib.contextmanager
def accelerator_paths() -> Iterator[None]:
    """Run the accelerator code paths on CPU (eager) inside the block: the operators a GPU step
    dispatches (each one a kernel launch there) can be counted, and their results checked, on a CPU.
    Tests and ``benchmarks/step_profile.py --accelerator-paths`` use it; it changes no dtype choice.

    Example:
        >>> with accelerator_paths():
        ...     host_path(torch.device("cpu"))
        False
    """
    global _SIMULATED_ACCELERATOR
    before, _SIMULATED_ACCELERATOR = _SIMULATED_ACCELERATOR, True
    try:
        yield
    finally:
        _SIMULATED_ACCELERATOR = before


# --------------------------------------------------------------------------------------------
# Newton--Schulz polar factor (Muon)
# --------------------------------------------------------------------------------------------


def gram(X: Tensor) -> Tensor:
    """``X X^T`` of a ``(m, n)`` or ``(B, m, n)`` tensor.

    On CPU (eager) one 2-D product per matrix: a batched ``bmm`` against the transposed view is up to
    5x slower there for small batches (bfloat16 ``1 x 768 x 2048``: 11.4 vs 2.3 ms on an AMX Xeon,
    one thread; on an AMD EPYC Zen 5 the two cost the same, ``benchmarks/shape_cost.py --batched``),
    and per-matrix products give each matrix the same bits however the step batches it.
    """
    if X.ndim == 3 and not host_path(X.device):
        return torch.bmm(X, X.mT)  # as ``X @ X.mT`` (the same kernel), without matmul's four views
    if X.ndim != 3:
        return X @ X.mT
    out = X.new_empty(X.shape[0], X.shape[1], X.shape[1])
    for i in range(X.shape[0]):
        torch.mm(X[i], X[i].T, out=out[i])
    return out


def aminmax(t: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.aminmax`` of all of ``t``, read in memory order.

    A whole-tensor reduction does not depend on the order of the entries, so a tensor whose dimensions
    are a permutation of a contiguous layout (a transposed view: how the backends see a tall matrix,
    and how its direction comes back) is reduced through the permutation that is contiguous. On CPU,
    ``torch.aminmax`` of a transposed view first copies it (torch 2.13; a one-off measurement on an AMX
    Xeon, one thread: 1.4-1.5 ms against 0.2 ms for a bfloat16 1376 x 512 matrix), and a step makes
    two such reductions per tall matrix.
    """
    if not t.is_contiguous() and t.ndim > 1:
        order = sorted(range(t.ndim), key=lambda d: (-t.stride(d), -t.size(d)))
        dense = t.permute(order)
        if dense.is_contiguous():
            t = dense
    return torch.aminmax(t)


def no_host_reads(t: Tensor) -> bool:
    """Whether ``t``'s values must not be read on the host: inside a compiled step (a read would break
    the graph), or on the meta device (shape-only dry runs: no values)."""
    return torch.compiler.is_compiling() or t.device.type == "meta"


def abs_max(t: Tensor) -> float:
    """``max |t_ij|`` read on the host, from one :func:`aminmax` (NaN if ``t`` holds a NaN: it reaches
    both ends; inf if it holds an Inf)."""
    lo, hi = aminmax(t)
    return max(hi.item(), -lo.item())


def _addmm(c: Tensor, a: Tensor, b: Tensor, *, beta: float, alpha: float = 1.0) -> Tensor:
    """``beta * c + alpha * a @ b`` for 2-D or batched 3-D operands (one fused kernel; on CPU, eager,
    one 2-D ``addmm`` per matrix, for the reasons of :func:`gram`)."""
    if a.ndim == 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    if not host_path(a.device):
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)
    out = torch.empty(c.shape, dtype=torch.promote_types(a.dtype, c.dtype), device=c.device)
    for i in range(a.shape[0]):
        torch.addmm(c[i], a[i], b[i], beta=beta, alpha=alpha, out=out[i])
    return out


# --------------------------------------------------------------------------------------------
# Safe scaling: every finite input, whatever its magnitude
# --------------------------------------------------------------------------------------------


def _max_exponent(dtype: torch.dtype) -> int:
    """``k`` with ``2^k`` the largest power of two representable in ``dtype`` (127 for float32)."""
    return math.frexp(torch.finfo(dtype).max)[1] - 1


def narrow_range(dtype: torch.dtype) -> bool:
    """Whether ``dtype``'s exponent range is narrower than float32's (float16: 2^15; bfloat16 has
    float32's, 2^127, though its largest value is slightly smaller): such work needs the power-of-two
    prescale on every path, since its raw norms and Gram matrices overflow or underflow."""
    return _max_exponent(dtype) < _max_exponent(torch.float32)


def pow2_exponent(X: Tensor, *, representable: bool = True) -> Tensor:
    r"""Per-matrix binary exponent ``e`` of ``max |X_ij|`` (``max |X_ij| = f 2^e``, ``f`` in [1/2, 1)).

    ``X 2^{-e}`` then has its largest entry in [1/2, 1), exactly (a power-of-two scaling rounds
    nothing). With ``representable=True``, ``e`` is clamped so that ``2^{-e}`` is representable in
    X's dtype and a normal number: a matrix of subnormal numbers is scaled up by ``2^{k_max}`` only,
    to ``max |X_ij| >= 2^-22`` in float32 (bfloat16 ``2^-6``, float16 ``2^-9``, float64 ``2^-51``), and
    one near the dtype's maximum down to ``max |X_ij|`` in [1/2, 4) (a subnormal factor would be
    flushed to zero where denormals are); a zero matrix has ``e = 0``.

    Args:
        X: ``(..., m, n)`` floating-point tensor.
        representable: clamp ``e`` so that ``2^{-e}`` is a representable normal number of X's dtype.

    Returns:
        ``(..., 1, 1)`` int32 tensor.
    """
    if host_path(X.device):
        # max |X_ij| as max(max X, -min X): two plain reductions, no |X| temporary (on CPU ~10x faster
        # than vector_norm(ord=inf), which was the largest elementwise cost of a Muon step here)
        amax = torch.maximum(X.amax(dim=(-2, -1), keepdim=True), -X.amin(dim=(-2, -1), keepdim=True))
    else:  # accelerators, compiled steps: one reduction kernel instead of four launches
        amax = torch.linalg.vector_norm(X, ord=math.inf, dim=(-2, -1), keepdim=True)
    e = torch.frexp(amax).exponent
    if not representable:
        return e
    return e.clamp(-_max_exponent(X.dtype), 1 - math.frexp(torch.finfo(X.dtype).tiny)[1])


def _times_pow2(X: Tensor, k: Tensor) -> Tensor:
    """``X 2^k`` per matrix, exactly, also where ``2^k`` itself is not representable (two factors)."""
    top = _max_exponent(X.dtype)
    k1 = k.clamp(-top, top)
    Y = X * pow2(k1, X.dtype)
    # The second factor is 1 except for matrices of subnormal (or near-overflow) numbers. On CPU, eager,
    # a check skips that pass; compiled (a data-dependent branch would break the graph) or on an
    # accelerator (the check would wait for the device) the exact second multiply always runs.
    if not host_path(X.device) or bool((k1 != k).any()):
        Y = Y * pow2(k - k1, X.dtype)
    return Y


def pow2(e: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^e`` (exact: integer ``e`` with ``2^e`` representable in ``dtype``)."""
    return torch.pow(2.0, e.to(torch.float64)).to(dtype)


def _raw_scale_is_bounded(p: float, dtype: torch.dtype, m: int, n: int) -> bool:
    """Whether ``U diag(s^p) V^T`` of *every* finite ``(m, n)`` matrix in ``dtype`` fits float32 and
    ``dtype`` with a margin for the approximate backends (``|O_ij| <= 4 s_max^p``, ``s_max <=
    sqrt(mn) max |G_ij|``): true for ``p <= 0.9`` in float32/bfloat16 at any practical shape, and
    for ``p <= 0.6`` in float16 up to ``m n = 2^18``."""
    top = min(_max_exponent(dtype), _max_exponent(torch.float32))
    return p * (_max_exponent(dtype) + 1 + 0.5 * math.log2(max(m * n, 1))) + 2 <= top


def _restore_raw_scale(O: Tensor, e: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """``O 2^{e p}``: the raw scale of ``U diag(s^p) V^T`` for a batch that was scaled by ``2^{-e}``.

    Computed in the wider of O's dtype and ``dtype``; where the result would exceed ``dtype``'s
    range (only when the true result itself does, up to the backends' approximation), the factor
    is capped so that ``max |O_ij|`` is just below ``finfo(dtype).max``: the direction is kept, the
    output stays finite.
    """
    if torch.finfo(dtype).max > torch.finfo(O.dtype).max:
        O = O.to(dtype)
    factor = torch.exp2(e.to(torch.float64) * p)
    m, n = O.shape[-2:]
    if not _raw_scale_is_bounded(p, dtype, m, n):
        amax = O.abs().amax(dim=(-2, -1), keepdim=True).to(torch.float64)
        cap = 0.99 * torch.finfo(dtype).max / amax.clamp_min(torch.finfo(torch.float64).tiny)
        factor = torch.minimum(factor, cap)
    return O * factor.clamp_max(torch.finfo(O.dtype).max).to(O.dtype)


# --------------------------------------------------------------------------------------------
# Defaults chosen by what the hardware does fast
# --------------------------------------------------------------------------------------------

#: CPU flags (``/proc/cpuinfo``) of instructions that make bfloat16 matrix products faster than
#: float32 ones: AMX tiles (Sapphire Rapids and later: 4-7x) and AVX-512 BF16 dot products (Cooper
#: Lake, Zen 4: ~2x). Without them (AVX2-only CPUs) a bfloat16 product is 30-180x *slower*.
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: Environment variable overriding the CPU probe: ``1`` (bfloat16 matmuls are fast) or ``0``.
CPU_BF16_ENV = "HTMUON_CPU_BF16"
#: Device types whose matrix units run bfloat16 fast (tensor cores and the like).
FAST_BF16_DEVICES = ("cuda", "xpu", "hpu", "xla")


@dataclass(frozen=True)
class Capability:
    """What a device does fast, as far as the backend defaults care (see :func:`decide`).

    Attributes:
        device_type: ``torch.device.type`` (``"cpu"``, ``"cuda"``, ``"mps"``, ...).
        fast_bf16: bfloat16 matrix products are at least as fast as float32 ones there.
    """

    device_type: str
    fast_bf16: bool

    @classmethod
    def from_cpu_flags(cls, flags) -> Capability:
        """A CPU's capability from its ``/proc/cpuinfo`` flags (any of :data:`FAST_BF16_CPU_FLAGS`)."""
        return cls("cpu", any(flag in FAST_BF16_CPU_FLAGS for flag in flags))


def decide(capability: Capability) -> tuple[str, torch.dtype]:
    """The ``(method, ns_dtype)`` that ``method="auto"`` / ``ns_dtype="auto"`` mean on a device.

    * bfloat16 matmuls fast (CUDA and other accelerators; CPUs with AMX-BF16 or AVX-512-BF16):
      ``("fast", torch.bfloat16)`` -- ``U S^p V^T`` from Newton--Schulz matmuls in bfloat16, at
      ~1.2x Muon's matmul count, as ``torch.optim.Muon`` works.
    * CPU without them (AVX2, AVX-512 without BF16, or flags unreadable): ``("eigh", torch.float32)``
      -- LAPACK's float64 eigendecomposition of the small Gram matrix is exact and cheaper there
      than float32 Newton--Schulz, and Muon's in-between steps (``interval``) run in float32
      (bfloat16 would be 30-180x slower).
    * other devices without fast bfloat16 (MPS, ...): ``("fast", torch.float32)`` (no LAPACK there).

    A pure function of ``capability``; :func:`device_capability` builds it for a real device.
    """
    if capability.fast_bf16:
        return "fast", torch.bfloat16
    if capability.device_type == "cpu":
        return "eigh", torch.float32
    return "fast", torch.float32


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of :data:`FAST_BF16_CPU_FLAGS` in the text of ``/proc/cpuinfo`` (first ``flags`` line)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split()) & frozenset(FAST_BF16_CPU_FLAGS)
    return frozenset()


def cpu_matmul_flags() -> frozenset[str]:
    """The flags of :data:`FAST_BF16_CPU_FLAGS` this machine's CPU reports (empty if unreadable).

    ``torch.backends.cpu.get_cpu_capability()`` reports only ``"AVX512"`` on AMX machines, so the
    flags are read from ``/proc/cpuinfo`` (Linux; elsewhere the set is empty: no fast bfloat16).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpu_flags(f.read())
    except OSError:
        return frozenset()


@torch.compiler.assume_constant_result
def _fast_bf16(device_type: str, env: str | None) -> bool:
    """Whether ``device_type`` does bfloat16 matmuls fast (cached; a compiled step takes the answer
    as a constant instead of tracing the ``/proc/cpuinfo`` read)."""
    key = (device_type, env)
    if key not in _FAST_BF16_CACHE:
        if device_type != "cpu":
            _FAST_BF16_CACHE[key] = device_type in FAST_BF16_DEVICES
        elif env is not None:
            if env not in ("0", "1"):
                raise ValueError(f"Invalid {CPU_BF16_ENV}={env!r} (must be 0 or 1)")
            _FAST_BF16_CACHE[key] = env == "1"
        else:
            _FAST_BF16_CACHE[key] = Capability.from_cpu_flags(cpu_matmul_flags()).fast_bf16
    return _FAST_BF16_CACHE[key]


_FAST_BF16_CACHE: dict[tuple[str, str | None], bool] = {}


def device_capability(device: torch.device | str) -> Capability:
    """The :class:`Capability` of ``device`` (cached per device type and ``HTMUON_CPU_BF16`` value).

    On CPU: ``fast_bf16`` if the CPU has AMX-BF16 or AVX-512-BF16 (:func:`cpu_matmul_flags`), unless
    the environment variable ``HTMUON_CPU_BF16`` is ``0`` or ``1``. Elsewhere: by device type
    (:data:`FAST_BF16_DEVICES`).
    """
    device_type = torch.device(device).type
    return Capability(device_type, _fast_bf16(device_type, os.environ.get(CPU_BF16_ENV)))


def ns_working_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """Resolve a Newton--Schulz working dtype: ``"auto"`` is bfloat16 where bfloat16 matmuls are fast
    (CUDA, CPUs with AMX/AVX-512-BF16) and float32 elsewhere (see :func:`decide`)."""
    if dtype == "auto":
        return decide(device_capability(device))[1]
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"Invalid Newton-Schulz dtype: {dtype!r} (a torch.dtype, 'auto' or None)")
    return dtype


def _check_real_floating(G: Tensor, name: str) -> None:
    """A ValueError naming the dtype for an integer, bool or complex ``G`` (torch's own error comes from
    deep inside a backend: ``torch.frexp() only supports floating-point dtypes``)."""
    if not G.is_floating_point():
        raise ValueError(
            f"{name} expects a real floating-point tensor, got {str(G.dtype).replace('torch.', '')} "
            "(cast it first, e.g. G.float())"
        )


def polar(
    G: Tensor,
    *,
    steps: int = MUON_NS_STEPS,
    coefficients: tuple[float, float, float] = MUON_NS5_COEFFICIENTS,
    dtype: torch.dtype | str | None = "auto",
    eps: float = NS_EPS,
) -> Tensor:
    r"""Approximate polar factor ``U V^T`` of ``G = U S V^T`` by Muon's quintic Newton--Schulz.

    .. math::  X_0 = G / \max(\|G\|_F, \epsilon), \quad A = X X^T, \quad
               X \leftarrow a X + (b A + c A^2) X

    Like Muon, the iteration is tuned for speed, not convergence: the singular values of the
    result lie roughly in [0.7, 1.2] instead of exactly 1.

    Args:
        G: ``(..., m, n)`` tensor.
        steps: number of quintic steps.
        coefficients: ``(a, b, c)``.
        dtype: working dtype: ``"auto"`` (bfloat16 where bfloat16 matmuls are fast, as in Muon: CUDA
            and CPUs with AMX / AVX-512-BF16; float32 on other CPUs; see :func:`ns_working_dtype`), a
            ``torch.dtype``, or ``None`` to keep G's dtype.
        eps: floor of the Frobenius norm, so a zero matrix maps to zero.

    Any finite G gives a finite result: before the cast to the working dtype and the Frobenius norm,
    G is scaled by a power of two (:func:`pow2_exponent`) to ``max |G_ij|`` in [1/2, 1). That
    scaling is exact and commutes with rounding, so the result is bit-identical to the unscaled
    iteration (and to ``torch.optim.Muon``'s) wherever that one neither over- nor underflows; there
    it is the polar factor instead of zeros (``torch.optim.Muon``'s norm overflows for ``||G||_F``
    above ~1.8e19 in float32 and ~65504 in float16). ``eps`` keeps its meaning, a floor on
    ``||G||_F`` of the unscaled G.

    Returns:
        ``(..., m, n)`` tensor in the working dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"polar expects a (..., m, n) tensor, got shape {tuple(G.shape)}")
    _check_real_floating(G, "polar")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"Invalid number of Newton-Schulz steps: {steps!r} (must be an integer >= 0)")
    a, b, c = coefficients
    dtype = ns_working_dtype(dtype, G.device)
    if host_path(G.device) and G.numel() > 0:
        X = _cpu_polar(G, steps, (a, b, c), dtype, eps)
        if X is not None:
            return X
    e = pow2_exponent(G)
    X = G * pow2(-e, G.dtype)
    X = X if dtype is None else X.to(dtype)
    # the floor eps on ||G||_F, in the scaled units (computed in float64: may be inf for tiny G)
    floor = (eps * pow2(-e, torch.float64)).clamp_max(torch.finfo(X.dtype).max).to(X.dtype)
    batch_shape = X.shape[:-2]
    if X.ndim > 3:
        X = X.reshape(-1, *X.shape[-2:])
        floor = floor.reshape(-1, 1, 1)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / torch.maximum(X.norm(dim=(-2, -1), keepdim=True), floor)
    for _ in range(steps):
        A = gram(X)
        B = _addmm(A, A, A, beta=b, alpha=c)
        X = _addmm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.reshape(*batch_shape, *X.shape[-2:])


#: Largest ``max |X_ij|`` for which the CPU path of :func:`polar` skips the power-of-two prescale: the
#: squares summed by the Frobenius norm stay below float32's range for any matrix of up to 2^48
#: entries (2^80 * 2^48 = 2^128 is the first overflow). Tiny entries need no prescale: their squares
#: underflow only where ``||G||_F`` is far below the ``eps`` floor, which then decides the scaling.
POLAR_PLAIN_MAX = 2.0**40


#: Smallest ``max |X_ij|`` for which :func:`spectral_power` takes the polar factor (``p = 0``, ``"ns"``)
#: without the prescale: ``||X||_F >= max |X_ij| >= 2^-20`` is above polar's ``eps`` floor (1e-7), so
#: the floor never acts, as in the prescaled iteration (whose ``||X||_F`` is at least 1/2).
POLAR_PLAIN_MIN = 2.0**-20


def _cpu_polar(
    G: Tensor,
    steps: int,
    coefficients: tuple[float, float, float],
    dtype: torch.dtype | None,
    eps: float,
    min_abs: float = 0.0,
) -> Tensor | None:
    """:func:`polar` on CPU (eager) without the prescale pass, or ``None`` where the prescale is needed.

    The cast to the working dtype comes first (as in ``torch.optim.Muon``), then one ``aminmax`` of
    the cast batch decides: where every entry is at most :data:`POLAR_PLAIN_MAX` in magnitude (or the
    batch is not finite: the caller's finite check refuses it), the exact power-of-two prescale would
    change no bit of the result, so the iteration runs on the cast batch as it is -- Muon's own
    operations, one 2-D product per matrix. This saves the float32 multiply over the whole batch.
    ``min_abs``: also take the prescaled path, for the whole batch, where ``max |X_ij|`` of any one
    matrix of it is below it (each matrix's own largest entry is compared: a batch's largest says
    nothing of a small matrix beside it, whose result would then depend on its neighbours; the
    prescale changes no bit of the others). float16 work always takes the prescaled path
    (its range is too narrow for the raw batch's norm).
    """
    a, b, c = coefficients
    if narrow_range(dtype or G.dtype):
        # float16 work: ||X||_F overflows float16 above 65504 (torch.optim.Muon then returns zeros) and
        # small entries are rounded into its subnormals by the cast; the prescaled path avoids both
        # (decided before the cast and the aminmax, which that path would not use)
        return None
    X = G if dtype is None or G.dtype == dtype else G.to(dtype)
    m, n = X.shape[-2:]
    mats = X.reshape(-1, m, n)
    if min_abs > 0.0 and mats.size(0) > 1:
        # the smallest matrix decides the floor: each matrix's max |X_ij| from one aminmax pass over
        # the batch (a reduction over both matrix dims: a transposed batch is read as its contiguous mT)
        dense = mats.mT if not mats.is_contiguous() and mats.mT.is_contiguous() else mats
        lo, hi = torch.aminmax(dense.reshape(dense.size(0), -1), dim=1)
        per = torch.maximum(hi, -lo)
        amax, amin = per.max().item(), per.min().item()
    else:
        amax = amin = abs_max(X)
    if amax > POLAR_PLAIN_MAX or amin < min_abs:  # NaN compares False: the plain path
        return None
    fresh = X is not G  # the cast is ours: normalise it in place, as torch.optim.Muon does
    # the last step writes each matrix into its slice of the output, wide as the iteration runs (a
    # tall batch comes back as its transposed view, as a single matrix does): no stacking pass
    out = torch.empty(mats.size(0), min(m, n), max(m, n), dtype=X.dtype, device=X.device)
    for i in range(mats.size(0)):
        Y = mats[i].T if m > n else mats[i]
        Y = Y.div_(Y.norm().clamp(min=eps)) if fresh else Y / Y.norm().clamp(min=eps)
        for t in range(steps):
            A = Y @ Y.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            Y = torch.addmm(Y, B, Y, beta=a, out=out[i] if t == steps - 1 else None)
        if steps == 0:
            out[i].copy_(Y)
    return (out.mT if m > n else out).reshape(X.shape)


# --------------------------------------------------------------------------------------------
# Spectrum weights and the exact backends (SVD, eigh)
# --------------------------------------------------------------------------------------------


def _rank_tolerance(s_max: Tensor, m: int, n: int, dtype: torch.dtype) -> Tensor:
    r"""Singular values at or below this are zero to the working precision of an SVD in ``dtype``.

    .. math::  \tau = \sqrt{\max(m, n)}\, \epsilon\, s_{max}

    A backward-stable SVD computes the exact singular values of ``G + E`` with ``||E||_2`` a small
    multiple of ``eps * s_max``, so a zero singular value comes out as noise of that size (measured
    in float32: 2-8 ``eps * s_max`` on exactly rank-deficient matrices from 64 x 96 to 1376 x 512),
    while every singular value above it is resolved. The common ``max(m, n) * eps`` rule (numpy's
    ``matrix_rank``) is far more conservative: it zeroes real singular values of square Gaussian
    matrices (``s_min / s_max ~ 1 / (2n)``, down to ~165 ``eps`` for 512 x 512).
    """
    return s_max * math.sqrt(max(m, n)) * torch.finfo(dtype).eps


def _input_floor(s_max: Tensor, m: int, n: int, input_dtype: torch.dtype) -> Tensor:
    """The :func:`_rank_tolerance` of a float32 (or lower-precision) input, even when the decomposition
    runs in float64: singular values that far below ``s_max`` are float32 rounding of the input's
    entries, not directions of the matrix. Lifting them (``s**p`` of ``1e-7 s_max`` is ``0.13 s_max**p``
    at p = 1/8) gave two float32 computations of the same momentum, which differ by rounding (a
    gradient averaged over ranks or over the whole batch at once), directions 8-23% apart. With the
    floor the float64 backends (eigh, ``compute_dtype=torch.float64``) zero the same singular values
    as the float32 SVD. A float64 input has no floor beyond its own working precision; 16-bit inputs
    get the float32 floor (their own rounding would zero most of a power-law spectrum)."""
    if input_dtype == torch.float64:
        return torch.zeros_like(s_max)
    return _rank_tolerance(s_max, m, n, torch.float32)


def spectrum_weights(s: Tensor, p: float, spectrum: str, tol: Tensor) -> Tensor:
    """The new singular values ``w`` for singular values ``s`` sorted in descending order.

    ``spectrum="power"``: ``w_i = s_i**p``; ``spectrum="rank"``: ``w_i = i**-p`` (1-based rank).
    Directions with ``s_i <= tol`` (zero to the working precision of the decomposition or of the
    input: see :func:`_rank_tolerance`, :func:`_input_floor` and the ``"eigh"`` backend) get
    ``w_i = 0``, so a zero or rank-deficient matrix never gains spurious directions (and ``0**0``
    never appears); every resolved singular value keeps its weight.
    """
    keep = s > tol
    if spectrum == "power":
        w = s.clamp_min(torch.finfo(s.dtype).tiny).pow(p)
    elif spectrum == "rank":
        ranks = torch.arange(1, s.size(-1) + 1, device=s.device, dtype=s.dtype)
        w = ranks.pow(-p).expand_as(s)
    else:  # pragma: no cover - validated by the dispatch
        raise ValueError(f"unknown spectrum {spectrum!r}; valid: {SPECTRA}")
    return torch.where(keep, w, torch.zeros_like(w))


def _robust_svd(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD that falls back instead of crashing when LAPACK/cuSOLVER does not converge.

    Order: the default driver; on CUDA the QR-based ``gesvd`` driver; float64; finally an
    eigendecomposition of the small Gram matrix. Each fallback warns once per call.
    """
    if X.device.type == "meta":  # shapes only: nothing to check
        return torch.linalg.svd(X, full_matrices=False)
    try:
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        if torch.isfinite(S).all():
            return U, S, Vh
        reason = "non-finite singular values"
    except (torch.linalg.LinAlgError, RuntimeError) as e:
        reason = str(e).splitlines()[0]
    attempts: list[tuple[str, Callable[[], tuple[Tensor, Tensor, Tensor]]]] = []
    if X.is_cuda:
        attempts.append(("gesvd driver", lambda: torch.linalg.svd(X, full_matrices=False, driver="gesvd")))
    if X.dtype != torch.float64:
        attempts.append(("float64", lambda: torch.linalg.svd(X.double(), full_matrices=False)))
    attempts.append(("Gram eigh", lambda: _svd_via_eigh(X.double())))
    for label, attempt in attempts:
        try:
            U, S, Vh = attempt()
        except (torch.linalg.LinAlgError, RuntimeError):
            continue
        if torch.isfinite(S).all():
            warnings.warn(
                f"torch.linalg.svd failed on a {tuple(X.shape)} {X.dtype} batch ({reason}); "
                f"fell back to {label}",
                RuntimeWarning,
                stacklevel=3,
            )
            return U.to(X.dtype), S.to(X.dtype), Vh.to(X.dtype)
    raise torch.linalg.LinAlgError(
        f"SVD failed on a {tuple(X.shape)} {X.dtype} batch ({reason}) and every fallback failed; "
        "is the input finite?"
    )


def _svd_via_eigh(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a wide ``X`` from ``eigh(X X^T)`` (last-resort fallback)."""
    lam, Q = torch.linalg.eigh(gram(X))
    lam, Q = lam.flip(-1), Q.flip(-1)
    s = lam.clamp_min(0).sqrt()
    inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    Vh = (Q.mT @ X) * inv.unsqueeze(-1)
    return Q, s, Vh


def _svd_backend(X: Tensor, p: float, spectrum: str, *, compute_dtype: torch.dtype | None = None) -> Tensor:
    """``U w V^T`` from the thin SVD, in ``compute_dtype``: by default float32, float64 for a float64 input
    (a float64 matrix is not decomposed in float32: that would zero its singular values below
    ``~3e-7 s_max`` and leave ``~1e-7`` errors in the rest; ``compute_dtype=torch.float32`` asks for it)."""
    dtype = compute_dtype or (torch.float64 if X.dtype == torch.float64 else torch.float32)
    Xc = X.to(dtype)
    # compiled steps cannot raise: LAPACK refuses a non-finite matrix, so it is swapped for zeros and its
    # result set to NaN, which the step masks (as the eigh backend does); eager callers check or raise
    finite = None
    if no_host_reads(X):
        finite = torch.isfinite(Xc).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
        Xc = torch.where(finite, Xc, torch.zeros_like(Xc))
    U, s, Vh = _robust_svd(Xc)
    m, n = X.shape[-2:]
    tol = torch.maximum(_rank_tolerance(s[..., :1], m, n, dtype), _input_floor(s[..., :1], m, n, X.dtype))
    w = spectrum_weights(s, p, spectrum, tol)
    return _masked((U * w.unsqueeze(-2)) @ Vh, finite)


def _gram_in(X: Tensor, dtype: torch.dtype) -> Tensor:
    """``X X^T`` of a wide ``(..., m, n)`` X computed in ``dtype`` (float64 for eigh), column block by
    column block: ``sum_j X_j X_j^T`` over blocks of ``m`` columns, each cast on its own. A float64
    copy of the whole of X would be the largest tensor of the eigh step (768 x 2048: 12.6 MB, 2.7x
    the Gram matrix); a block is no larger than the Gram matrix."""
    m, n = X.shape[-2:]
    if X.dtype == dtype or n <= m:
        return gram(X.to(dtype))
    A = gram(X[..., :m].to(dtype))
    for j in range(m, n, m):
        Xb = X[..., j : j + m].to(dtype)
        A = _addmm(A, Xb, Xb.mT, beta=1.0)
    return A


def _eigh_backend(X: Tensor, p: float, spectrum: str, *, compute_dtype: torch.dtype | None = None) -> Tensor:
    """``U w V^T = Q diag(w / s) Q^T X`` from ``eigh`` of the small Gram matrix ``X X^T = Q s^2 Q^T``.

    The Gram matrix squares G's condition number: in a working dtype with unit roundoff ``eps``, an
    eigenvalue of the Gram matrix carries an absolute error of up to about ``m * eps * s_max^2``, so
    singular values at or below ``sqrt(m * eps) * s_max`` are zero to working precision and get zero
    weight; all others are resolved. In float32 that is ~1e-2 * s_max, which discards most of a
    power-law spectrum (80% error on s_k = 1/k, 512 x 1376), so the default working dtype is
    float64 (resolves a float64 input down to ~3e-7 * s_max; on CPU about the cost of Muon's float32
    Newton--Schulz). ``compute_dtype=torch.float32`` is the fast, rough option for well-conditioned
    inputs. A float32 input is resolved down to its own rounding only (:func:`_input_floor`).
    """
    dtype = compute_dtype or torch.float64
    # compiled steps read nothing on the host and cannot raise: a non-finite Gram matrix (LAPACK
    # would raise) is swapped for the identity, its result set to NaN, and the step masks itself
    # (meta tensors, shape-only dry runs, have no values to read either: the same path)
    compiling = no_host_reads(X)
    A = _gram_in(X, dtype)
    finite = None
    if compiling:
        finite = torch.isfinite(A).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
        A = torch.where(finite, A, torch.eye(A.size(-1), dtype=A.dtype, device=A.device))
    lam, Q = torch.linalg.eigh(A)
    del A
    if not compiling and not bool(torch.isfinite(lam).all()):
        raise torch.linalg.LinAlgError(
            f"eigh of the Gram matrix of a {tuple(X.shape)} {X.dtype} batch gave non-finite eigenvalues; "
            "is the input finite?"
        )
    lam, Q = lam.flip(-1), Q.flip(-1)  # descending, to match the SVD's order (rank spectrum)
    s = lam.clamp_min(0).sqrt()
    # The sqrt-precision limit of the Gram route: an eigenvalue of X X^T carries an absolute error of
    # up to ~ m eps lam_max (measured on exactly rank-deficient float32 inputs with a float64 Gram:
    # zero singular values come out at ~0.2 eps_fp32 s_max, below this tolerance; resolved ones above).
    tol = (lam[..., :1].clamp_min(0) * X.size(-2) * torch.finfo(dtype).eps).sqrt()
    tol = torch.maximum(tol, _input_floor(s[..., :1], X.size(-2), X.size(-1), X.dtype))
    w = spectrum_weights(s, p, spectrum, tol)
    coeff = torch.where(w > 0, w / s.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(w))
    out_dtype = torch.float64 if torch.float64 in (X.dtype, compute_dtype) else torch.float32
    if out_dtype != dtype:
        # The product M X in float32 errs by ~ eps_fp32 * max(w / s) * s_max in the spectral norm:
        # harmless unless a tiny kept singular value gets a huge coefficient (p near 0, s_min near the
        # resolution limit). Then Q^T X runs in the working dtype and only Q (Y) in float32.
        # (compiled: always, as the choice would need a host read.) Chosen per matrix: a batch's
        # largest gain says nothing of the other matrices in it, whose bits would then depend on their
        # neighbours (how a step batches them: chunk_bytes, or a DDP / FSDP2 owner's share).
        if compiling:
            return _masked(_eigh_precise_product(Q, X, coeff, dtype, out_dtype), finite)
        gain = coeff.amax(-1) * s[..., 0] / w.amax(-1).clamp_min(torch.finfo(dtype).tiny)
        precise = (gain * torch.finfo(out_dtype).eps > EIGH_FP32_PRODUCT_LIMIT).reshape(-1)
        count = int(precise.sum())
        if count == precise.numel():
            return _eigh_precise_product(Q, X, coeff, dtype, out_dtype)
        if count:  # some matrices of the batch: each takes its own product
            m, n = X.shape[-2:]
            Xb, Qb, cb = X.reshape(-1, m, n), Q.reshape(-1, m, m), coeff.reshape(-1, m)
            out = torch.empty(Xb.shape, dtype=out_dtype, device=X.device)
            hi, lo = precise.nonzero().squeeze(1), (~precise).nonzero().squeeze(1)
            out[hi] = _eigh_precise_product(Qb[hi], Xb[hi], cb[hi], dtype, out_dtype)
            out[lo] = _eigh_product(Qb[lo], Xb[lo], cb[lo], out_dtype)
            return out.reshape(X.shape)
    return _masked(_eigh_product(Q, X, coeff, out_dtype), finite)


def _eigh_product(Q: Tensor, X: Tensor, coeff: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``Q diag(coeff) Q^T X``: ``M = Q diag(w / s) Q^T`` on the small side (m^3), then one m x m x n
    product in ``out_dtype`` (X's precision, float32 unless X is float64): the Gram matrix and eigh need
    float64, the product does not."""
    M = (Q * coeff.unsqueeze(-2)) @ Q.mT
    return M.to(out_dtype) @ X.to(out_dtype)


def _eigh_precise_product(
    Q: Tensor, X: Tensor, coeff: Tensor, dtype: torch.dtype, out_dtype: torch.dtype
) -> Tensor:
    """``Q diag(coeff) Q^T X`` with ``Q^T X`` in the working ``dtype`` and only ``Q`` (Y) in ``out_dtype``."""
    Y = (Q.mT @ X.to(dtype)) * coeff.unsqueeze(-1)
    return Q.to(out_dtype) @ Y.to(out_dtype)


def _masked(out: Tensor, finite: Tensor | None) -> Tensor:
    """``out`` with NaN for the matrices whose ``finite`` flag is False (``None``: all kept)."""
    return out if finite is None else torch.where(finite, out, torch.full_like(out, float("nan")))


# --------------------------------------------------------------------------------------------
# The paper's Newton--Schulz path, generalised to any p
# --------------------------------------------------------------------------------------------


def _coupled_ns_sqrt(A: Tensor, iters: int) -> Tensor:
    """Principal square root of a symmetric PSD batch ``A`` by the coupled Newton--Schulz iteration.

    ``Y_0 = A / c, Z_0 = I``; ``T = (3I - Z Y) / 2``; ``Y <- Y T``, ``Z <- T Z``; then
    ``A^(1/2) = sqrt(c) * Y``. ``c = ||A||_F`` puts the spectrum in (0, 1]. Eigenvalues far below
    ``c`` converge slowly (this is the inaccuracy of the paper's NS path).
    """
    c = A.norm(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
    eye = torch.eye(A.size(-1), dtype=A.dtype, device=A.device).expand_as(A)
    Y, Z = A / c, eye
    for _ in range(iters):
        T = 1.5 * eye - 0.5 * (Z @ Y)
        Y, Z = Y @ T, T @ Z
    return Y * c.sqrt()


def _ns_backend(
    X: Tensor,
    p: float,
    spectrum: str,
    *,
    compute_dtype: torch.dtype | None = None,
    ns_steps: int = MUON_NS_STEPS,
    ns_dtype: torch.dtype | str | None = "auto",
    root_iters: int = NS_ROOT_ITERS,
    max_roots: int = NS_MAX_ROOTS,
) -> Tensor:
    """``U S^p V^T = (X X^T)^(p/2) polar(X)`` with Newton--Schulz only (the paper's HTMuon NS idea).

    The paper applies four nested coupled-NS square roots to get ``(X^T X)^(1/16)`` (p = 1/8 only).
    Here ``p/2`` is expanded in binary, ``p/2 = sum_k b_k 2^-k``, and the Gram power is the
    product of the nested roots ``A^(2^-k)`` whose bit is set -- any ``p`` in [0, 1] to within
    ``2**-max_roots`` in the exponent -- on the small ``m x m`` Gram side. The polar factor runs in
    ``ns_dtype`` (see :func:`polar`); the roots run in ``compute_dtype`` (float32 by default).
    """
    P = polar(X, steps=ns_steps, dtype=ns_dtype)
    if p == 0.0:
        return P
    dtype = compute_dtype or torch.float32
    Xc = X.to(dtype)
    # The nested roots apply p' = p truncated to max_roots bits, so the Gram power is taken of the
    # Frobenius-normalised X (an orthogonally invariant scale) and ||X||_F^p restores the exact scale
    # law f(cX) = c^p f(X).
    root = gram(Xc)
    fro2 = root.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(torch.finfo(dtype).tiny)
    root = root / fro2
    fro = fro2.sqrt()
    power: Tensor | None = None
    exponent = p / 2.0
    for k in range(1, max_roots + 1):
        if exponent <= 0.0:
            break
        root = _coupled_ns_sqrt(root, root_iters)
        bit = 2.0**-k
        if exponent >= bit:
            exponent -= bit
            power = root if power is None else power @ root
    if power is None:  # p/2 < 2**-max_roots: the Gram power is the identity to that precision
        return P * fro.pow(p).to(P.dtype)
    return (power * fro.pow(p)) @ P.to(dtype)


register_backend(
    "svd",
    _svd_backend,
    spectra=("power", "rank"),
    description="exact thin SVD (float32; float64 for float64 input or with compute_dtype=torch.float64)",
    options=("compute_dtype",),
)
register_backend(
    "eigh",
    _eigh_backend,
    spectra=("power", "rank"),
    description="eigh of the small Gram matrix (float64 by default), then Q diag(s^(p-1)) Q^T G",
    options=("compute_dtype",),
)
register_backend(
    "ns",
    _ns_backend,
    spectra=("power",),
    description="paper's NS path generalised: NS5 polar x Gram power from nested NS square roots",
    options=("compute_dtype", "ns_dtype", "ns_steps"),
)


# --------------------------------------------------------------------------------------------
# The dispatch
# --------------------------------------------------------------------------------------------

#: ``method="auto"`` overrides per device type (e.g. ``AUTO_METHODS["cpu"] = "svd"``); device types
#: not in it use :func:`decide` on the device's :func:`device_capability`. Empty by default.
AUTO_METHODS: dict[str, str] = {}


def resolve_method(method: str, spectrum: str, device: torch.device | str) -> str:
    """The backend that ``method`` names for a tensor on ``device``: ``"auto"`` is resolved by
    :data:`AUTO_METHODS`, else by :func:`decide` (``"fast"`` where bfloat16 matmuls are fast, ``"eigh"``
    on other CPUs); a spectrum the choice cannot do (``"rank"`` for ``"fast"``) falls back to
    ``"eigh"``. Any other name is returned unchanged."""
    if method != "auto":
        return method
    device = torch.device(device)
    resolved = AUTO_METHODS.get(device.type) or decide(device_capability(device))[0]
    backend = BACKENDS.get(resolved)
    if backend is None or spectrum not in backend.spectra:
        resolved = "eigh"
    return resolved


def _auto_backend(X: Tensor, p: float, spectrum: str, **options) -> Tensor:
    """``method="auto"``: the backend :func:`resolve_method` picks for X's device."""
    return BACKENDS[resolve_method("auto", spectrum, X.device)].fn(X, p, spectrum, **options)


register_backend(
    "auto",
    _auto_backend,
    spectra=("power", "rank"),
    description="per device: 'fast' where bfloat16 matmuls are fast, else 'eigh' on CPU (see decide)",
)


def _check_backend(method: str, spectrum: str) -> Backend:
    try:
        backend = BACKENDS[method]
    except KeyError:
        raise ValueError(f"Invalid spectral method: {method!r}; valid methods: {sorted(BACKENDS)}") from None
    if spectrum not in SPECTRA:
        raise ValueError(f"Invalid spectrum: {spectrum!r}; valid: {SPECTRA}")
    if spectrum not in backend.spectra:
        able = sorted(name for name, b in BACKENDS.items() if spectrum in b.spectra)
        raise ValueError(f"method {method!r} does not support spectrum={spectrum!r}; use one of {able}")
    return backend


def spectral_power(
    G: Tensor,
    p: float,
    *,
    method: str = "svd",
    spectrum: str = "power",
    scale: str = "raw",
    **options,
) -> Tensor:
    r"""Heavy-tailed spectral map: ``G = U diag(s) V^T  ->  U diag(w) V^T``.

    .. math::  w_i = s_i^p \ (\text{spectrum="power"}), \qquad w_i = i^{-p}\ (\text{spectrum="rank"})

    ``p = 0`` gives the polar factor ``U V^T`` (Muon); ``p = 1`` returns ``G``. With
    ``scale="raw"`` (the paper's, faithful) the raw singular values are raised to ``p``, so the
    result scales as ``||G||^p``; ``scale="muon_rms"`` rescales it to Frobenius norm
    ``sqrt(min(m, n))``, the norm of an exact polar factor: scale-invariant, with Muon's RMS.

    Every finite ``G`` gives a finite result, in every dtype and at every magnitude: backends see
    the batch scaled by a power of two to ``max |G_ij|`` in [1/2, 1) (exact; see
    :class:`Backend`'s ``scale_safe``), and the raw scale ``2^(e p)`` is restored in float64 where
    needed. The restored result is capped at the dtype's range only where the true result itself
    exceeds it (``p`` near 1 with ``||G||_2`` beyond ``finfo(G.dtype).max``).

    Args:
        G: ``(..., m, n)`` tensor (any leading batch).
        p: exponent in [0, 1].
        method: a key of :data:`BACKENDS` (``"svd"``, ``"eigh"``, ``"ns"``, ``"fast"``, ``"fast5"``,
            or ``"auto"``: per device, see :func:`resolve_method`).
        spectrum: ``"power"`` or ``"rank"``.
        scale: ``"raw"`` or ``"muon_rms"``.
        **options: passed to the backend (e.g. ``compute_dtype=torch.float64``); with ``method="auto"``
            only those the backend chosen for the device declares (:class:`Backend` ``options``), as
            :class:`htmuon.HTMuon` passes them; an option of :data:`BACKEND_OPTIONS` that a named
            backend does not declare is a ``ValueError``.

    Returns:
        ``(..., m, n)`` tensor in G's dtype.

    Example:
        >>> G = torch.randn(64, 32)
        >>> O = spectral_power(G, 0.125)
        >>> O.shape
        torch.Size([64, 32])
    """
    return spectral_map(G, p, method=method, spectrum=spectrum, scale=scale, **options).to(G.dtype)


def spectral_map(
    G: Tensor,
    p: float,
    *,
    method: str = "svd",
    spectrum: str = "power",
    scale: str = "raw",
    **options,
) -> Tensor:
    """:func:`spectral_power` without the final cast: the result in the backend's working dtype
    (bfloat16 for the Newton--Schulz backends with bfloat16 work, float32 or float64 otherwise), which
    the optimizer adds to its parameters as it is (the add upcasts it exactly)."""
    if G.ndim < 2:
        raise ValueError(f"spectral_power expects a (..., m, n) tensor, got shape {tuple(G.shape)}")
    _check_real_floating(G, "spectral_power")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:  # NaN: refused
        raise ValueError(f"Invalid exponent p: {p!r} (must be a real number in [0, 1], not a bool or tensor)")
    if scale not in SCALES:
        raise ValueError(f"Invalid scale: {scale!r}; valid: {SCALES}")
    backend = _check_backend(resolve_method(method, spectrum, G.device), spectrum)
    if method == "auto":  # what the backend chosen for this device declares, as HTMuon passes them
        options = {k: v for k, v in options.items() if k in backend.options or k not in BACKEND_OPTIONS}
    undeclared = sorted(k for k in options if k in BACKEND_OPTIONS and k not in backend.options)
    if undeclared:
        raise ValueError(
            f"method {backend.name!r} takes no option {', '.join(undeclared)} (it takes {backend.options})"
        )
    m, n = G.shape[-2:]
    if G.numel() == 0:
        return torch.zeros_like(G)
    p = float(p)
    if spectrum == "power" and p == 1.0 and scale == "raw":
        return G.clone()  # U S V^T = G, exactly
    X = G.reshape(-1, m, n)
    transposed = m > n
    if transposed:
        X = X.mT
    O = None
    if p == 0.0 and backend.name == "ns" and host_path(X.device):
        # the polar factor alone: without the prescale pass where it would change no bit (the norm is
        # above polar's eps floor and far from over- and underflow); None where it is needed
        dtype = ns_working_dtype(options.get("ns_dtype", "auto"), X.device)
        steps = options.get("ns_steps", MUON_NS_STEPS)
        O = _cpu_polar(X, steps, MUON_NS5_COEFFICIENTS, dtype, NS_EPS, min_abs=POLAR_PLAIN_MIN)
    if O is None and backend.scale_safe and _raw_scale_is_bounded(p, G.dtype, m, n):
        O = backend.fn(X, p, spectrum, **options)
    elif O is None:
        # Any finite input: the backend sees max |X_ij| in [1/2, 1) (an exact power-of-two scaling),
        # so no Gram matrix, norm or root can over- or underflow; the raw scale is restored after.
        e = pow2_exponent(X, representable=False)
        O = backend.fn(_times_pow2(X, -e), p, spectrum, **options)
        if scale == "raw" and spectrum == "power" and p > 0.0:
            O = _restore_raw_scale(O, e, p, G.dtype)
    if transposed:
        O = O.mT
    if scale == "muon_rms":
        norm = torch.linalg.vector_norm(O, dim=(-2, -1), keepdim=True, dtype=torch.float64)
        factor = torch.where(
            norm > 0, math.sqrt(min(m, n)) / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0
        )
        O = O * factor.to(O.dtype)
    return O.reshape(G.shape)
