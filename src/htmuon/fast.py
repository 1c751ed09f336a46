"""The ``"fast"`` spectral backend: ``U diag(s**p) V^T`` with matrix multiplications only, at Muon's cost.

Muon's Newton--Schulz iteration runs odd quintic steps ``X <- a X + (b A + c A^2) X`` (``A = X X^T``)
and keeps the last iterate, an approximate polar factor ``U V^T``. Each iterate ``X_t`` is itself
``U f_t(x) V^T`` for a scalar odd polynomial ``f_t`` of the normalised singular values ``x``, and the
``f_t`` rise from ``x`` (``t = 0``) to about 1 at geometrically spaced scales. So a weighted sum of the
iterates -- one axpy per step, no extra matmul -- is ``U f(x) V^T`` with ``f = sum_t w_t f_t``, and
the weights can make ``f(x)`` close to ``x**p`` for any ``p`` in [0, 1] (the Soft Muon / "spectral
powers" idea). This module holds:

* the per-step coefficients ``(a_t, b_t, c_t)``, fitted offline by ``scripts/fit_fast_coefficients.py``
  (one set serves every ``p``; see the provenance notes on :data:`FAST6_COEFFICIENTS`);
* :func:`output_weights`: the weights ``w_t`` for a given ``p``, re-solved from those coefficients
  by a small ridge least-squares problem (float64, cached) -- the same solve the fit uses;
* :func:`fast_spectral_power`: the matrix iteration, registered as the backends ``"fast"`` (6 steps,
  ~1.2x Muon's matmuls, ~1.5% error) and ``"fast5"`` (5 steps, Muon's matmul count, ~5-8% error).

Normalisation. The iteration needs singular values in (0, 1]. ``A = X X^T`` and ``A^2``, both needed
by the first step anyway, give the Frobenius norm (the trace of ``A``) and the Schatten-8 norm for
free: ``r2 = ||A^2||_F^(1/2) = (sum x^8)^(1/4) >= x_max^2``, a bound within ``m^(1/8)`` of ``x_max``
instead of the Frobenius norm's ``m^(1/2)`` (about one decade of spectrum gained). The map sees
``x = s / ||X||_S8``; the factor ``1 / ||X||_S8`` is never applied to the ``m x n`` matrix: it goes into
step 1's ``m x m`` matrix and into the output weights, and the raw spectrum comes back through the
factor ``||X||_S8^p``: ``U s^p V^T = ||X||_S8^p U x^p V^T``. Any scale of X works as long as the
products neither over- nor underflow. On CPU, where ``max |X_ij|`` is outside [``FAST_PLAIN_MIN``,
``FAST_PLAIN_MAX``] (decided by one ``aminmax``), X is first scaled by an exact power of two to
``max |X_ij|`` in [1/2, 1) and the factor restored in float64. On accelerators and in compiled steps X
is always scaled so (seven kernels; the exponent clamped so that the factor is a normal number: a
matrix of subnormals ends lower, one near the dtype's maximum higher, both still in range). So every
finite input is safe.

Cost. Each step is ONE product of the iterate: ``X_t = (a_t I + b_t A + c_t A^2) X_{t-1}`` (the ``a_t``
term on the diagonal of the ``m x m`` polynomial), i.e. Muon's three products and no elementwise
pass over the ``m x n`` iterate. On CPU (one matrix at a time, scalars on the host) the output sum is
kept in the working dtype relative to its first iterate term, ``S = X_j + sum_t (w_t / w_j) X_t``: the
first add also reads ``X_0`` (no pass of its own) and writes into the output's buffer, then one
scaled add per step; the last two terms (``X_{T-1}``'s weight on the diagonal of the last ``m x m``
matrix) and the factor ``||X||_S8^p w_j`` go into one in-place ``addmm_`` with ``beta=1`` and one
scaling pass (oneDNN builds a new kernel for every distinct ``beta`` of a bfloat16 ``addmm``: ~10 ms
per call, measured). Step 1's ``m x m`` matrix takes three passes: ``1/||X||_F^4`` rides on the
float32 accumulator of the ``A A`` product (``alpha``), and its float32 sum is scaled and rounded in
one pass.
Batched (accelerators, compiled steps) the per-matrix factors are ``(B, 1, 1)`` tensors. With bfloat16
work the iterate and the output live in bfloat16, as Muon's iterate and update do.

Accuracy (tolerances checked in ``tests/test_fast.py``, measurements in BENCHMARKS.md and
``benchmarks/fast_accuracy.py``): on spectra spanning three decades (``s_min >= 1e-3 s_max``),
``"fast"`` is within ~1.2-1.8% of float64 exact ``U S^p V^T`` in float32 for ``p <= 1/4`` (RMS
relative error of the scalar map on the fitted domain: 1.4-1.9% for p in [0, 1/2]) and 1.5-7.5%
with bfloat16 work (power-law spectra: <= 4.8%; log-uniform ones suffer most from the bfloat16
iterate); ``"fast5"`` ~5-8% (float32), 6-11% (bfloat16).
Rounding a matrix with such a spectrum to bfloat16 alone moves its exact ``U S^p V^T``
by up to ~9% (small singular directions are lifted by ``s^p``). Singular values below the domain
(``x < FAST_DOMAIN_LO``) are damped towards 0, as Muon damps them, never amplified past ``s^p``.

References:
    Polar Express (Amsel et al., arXiv 2505.16932) for per-step fitted odd polynomials; CANS
    (Grishina et al., arXiv 2506.10935); Soft Muon and the "spectral powers" essay for weighted sums of
    Newton--Schulz iterates; Muon^p (arXiv 2606.13867) for ``U S^p V^T`` at Muon's cost.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from .spectral import (
    _addmm,
    _times_pow2,
    abs_max,
    gram,
    host_path,
    narrow_range,
    ns_working_dtype,
    pow2_exponent,
    register_backend,
)

__all__ = [
    "FAST5_COEFFICIENTS",
    "FAST6_COEFFICIENTS",
    "FAST_COEFFICIENTS",
    "FAST_DOMAIN_LO",
    "FAST_FIT_PROVENANCE",
    "fast_spectral_power",
    "output_weights",
    "scalar_iterates",
]

# --------------------------------------------------------------------------------------------
# The fit's definition (shared by the runtime weight solve and scripts/fit_fast_coefficients.py)
# --------------------------------------------------------------------------------------------

#: Lower end of the fitted domain of normalised singular values ``x = s / ||G||_S8`` (upper end 1).
FAST_DOMAIN_LO = 7e-4
#: Points of the log-spaced grid on ``[FAST_DOMAIN_LO, 1]`` where ``f(x) ~ x**p`` is fitted.
FAST_GRID_POINTS = 200
#: Ridge on the output weights (keeps ``sum |w_t|`` near 1, so bfloat16 rounding is not amplified).
FAST_RIDGE = 1e-6

# Coefficients (a_t, b_t, c_t) of the quintic steps x <- a x + b x^3 + c x^5.
# Provenance: the output of `python scripts/fit_fast_coefficients.py` (seed 0; 12 L-BFGS runs, one
# from each of the 12 best self-similar starting points, with a continuation of the domain's lower
# end 1e-2 -> 3e-3 -> 1e-3 -> 7e-4; the best run is kept), for the fit definition above (domain,
# grid, ridge) and the script's FIT_EXPONENTS = (0, 1/16, 1/8, 1/4, 1/2), iterate bound 1.25 and noise
# amplification bound 10 (TAIL_BOUND: the first 5-step set, fitted without it, amplified bfloat16
# rounding up to 216x and returned updates ~100x too large on ~0.3% of small power-law matrices; the
# 6-step set meets the bound as it was fitted, so it is unchanged).
# `python scripts/fit_fast_coefficients.py --steps 6 --runs 9 --check` re-runs the winning run
# alone and compares *objectives* (the fit is non-convex: another CPU or BLAS lands on other
# coefficients of similar quality); tests/test_fast.py does so.
#: How each set was obtained: the winning run of the fit and its objective (mean RMS relative error).
FAST_FIT_PROVENANCE: dict[str, dict[str, float]] = {
    "fast": {"steps": 6, "seed": 0, "run": 9, "objective": 0.017032},
    "fast5": {"steps": 5, "seed": 0, "run": 4, "objective": 0.079190},
}
#: 6 steps (the ``"fast"`` backend).
FAST6_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (4.229450106001744, -9.411784242859694, 5.9306722025776155),
    (3.725210753575241, -6.0587649467881945, 2.6394193752756525),
    (3.7061976144025666, -5.59961729756739, 2.356428851669908),
    (3.6660658757048226, -5.44954621706651, 2.130963251156173),
    (3.413483090380038, -4.963068276511051, 2.195952598018505),
    (2.830439820753359, -2.604826208278047, 0.9477751349631164),
)
#: 5 steps (the ``"fast5"`` backend: Muon's matmul count).
FAST5_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (4.202868848286102, -10.439192519897427, 6.913889312735641),
    (4.535627296728332, -10.443569619511278, 6.310854292277833),
    (3.832220599155633, -7.294857028122793, 3.5685496375657273),
    (2.5340877362499032, -5.0580119154247765, 2.8060729917305047),
    (0.8185458333751009, -2.670860422087257, 2.962379132408502),
)
#: Backend name -> step coefficients.
FAST_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "fast": FAST6_COEFFICIENTS,
    "fast5": FAST5_COEFFICIENTS,
}


def fit_grid(lo: float = FAST_DOMAIN_LO, points: int = FAST_GRID_POINTS) -> np.ndarray:
    """The log-spaced grid on ``[lo, 1]`` of the fit (float64)."""
    return np.logspace(math.log10(lo), 0.0, points)


def scalar_iterates(coefficients, x: np.ndarray) -> np.ndarray:
    """The scalar iterates ``f_t(x)``, ``t = 0..T``, as columns: ``f_0 = x`` and
    ``f_t = a_t f + b_t f^3 + c_t f^5`` with ``f = f_{t-1}``."""
    out = [np.asarray(x, dtype=np.float64)]
    for a, b, c in coefficients:
        f = out[-1]
        f2 = f * f
        out.append(f * (a + f2 * (b + c * f2)))
    return np.stack(out, axis=-1)


def solve_output_weights(basis: np.ndarray, x: np.ndarray, p: float, ridge: float = FAST_RIDGE) -> np.ndarray:
    """Ridge least squares for the output weights: ``min_w ||(basis w) / x^p - 1||^2 + ridge ||w||^2``.

    ``basis`` is ``scalar_iterates(coefficients, x)``; the residual is the relative error of
    ``f = basis @ w`` against ``x**p`` on the grid (an RMS over a log-uniform spectrum).
    """
    A = basis / x[:, None] ** p
    k = A.shape[1]
    lhs = np.concatenate([A, math.sqrt(ridge) * np.eye(k)])
    rhs = np.concatenate([np.ones(len(x)), np.zeros(k)])
    return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


# Solved once per (p, coefficients) in float64 NumPy and kept (a plain dict, not functools.lru_cache:
# Dynamo ignores that wrapper and would trace the NumPy solve); a pure function of its hashable
# arguments, so a compiled step calls it at trace time and bakes the weights in as constants.
_OUTPUT_WEIGHTS: dict[tuple, tuple[float, ...]] = {}


@torch.compiler.assume_constant_result
def output_weights(p: float, coefficients: tuple[tuple[float, float, float], ...]) -> tuple[float, ...]:
    """Weights ``w_0..w_T`` with ``sum_t w_t f_t(x) ~ x**p`` on ``[FAST_DOMAIN_LO, 1]`` (cached per ``p``)."""
    key = (p, coefficients)
    w = _OUTPUT_WEIGHTS.get(key)
    if w is None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Invalid exponent p: {p!r} (must be in [0, 1])")
        x = fit_grid()
        w = tuple(float(v) for v in solve_output_weights(scalar_iterates(coefficients, x), x, p))
        if len(_OUTPUT_WEIGHTS) < 1024:
            _OUTPUT_WEIGHTS[key] = w
    return w


# --------------------------------------------------------------------------------------------
# The matrix iteration
# --------------------------------------------------------------------------------------------


def fast_spectral_power(
    X: Tensor,
    p: float,
    spectrum: str = "power",
    *,
    coefficients: tuple[tuple[float, float, float], ...] = FAST6_COEFFICIENTS,
    compute_dtype: torch.dtype | None = None,
    ns_dtype: torch.dtype | str | None = "auto",
) -> Tensor:
    r"""``U diag(s**p) V^T`` of a wide batch ``X = U diag(s) V^T`` (``(B, m, n)``, ``m <= n``), matmuls only.

    .. math::
        X_0 = G / \|G\|_{S_8}, \quad A = X_{t-1} X_{t-1}^\top, \quad
        X_t = a_t X_{t-1} + (b_t A + c_t A^2) X_{t-1}, \quad
        O = \|G\|_{S_8}^p \sum_{t=0}^{T} w_t(p) X_t

    Args:
        X: wide batch ``(B, m, n)``.
        p: exponent in [0, 1] (``p = 1`` returns ``X`` exactly).
        spectrum: only ``"power"``.
        coefficients: the quintic steps (:data:`FAST6_COEFFICIENTS` or :data:`FAST5_COEFFICIENTS`).
        compute_dtype: working dtype of the iteration, overriding ``ns_dtype`` (e.g. ``torch.float64``).
        ns_dtype: working dtype as for :func:`htmuon.polar`: ``"auto"`` (bfloat16 where bfloat16 matmuls
            are fast: CUDA, AMX/AVX-512-BF16 CPUs; float32 elsewhere), a ``torch.dtype``, or ``None``.

    Returns:
        ``(B, m, n)`` in the working dtype (bfloat16 with bfloat16 work, as Muon's update; float32 or
        float64 otherwise). :func:`htmuon.spectral_power` casts it to the input's dtype.
    """
    if spectrum != "power":  # pragma: no cover - the dispatch checks the backend's spectra
        raise ValueError(f"the fast backend supports spectrum='power' only, got {spectrum!r}")
    dtype = compute_dtype or ns_working_dtype(ns_dtype, X.device) or X.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if p == 1.0:
        return X.to(acc)
    w = output_weights(float(p), tuple(tuple(c) for c in coefficients))
    if X.ndim == 3 and host_path(X.device):
        # CPU, eager: one matrix at a time with its scalars on the host (2-D products; mixed-dtype
        # elementwise kernels with per-matrix tensor factors copy their operands there); each
        # matrix's output sum is built in its slice of the batch's output (no stacking pass)
        out = torch.empty(X.shape, dtype=dtype, device=X.device)
        for x, o in zip(X, out):
            _fast_iteration(x, p, w, coefficients, dtype, acc, out=o)
        return out
    return _fast_iteration(X, p, w, coefficients, dtype, acc)


def _fast_iteration(
    X: Tensor,
    p: float,
    w: tuple[float, ...],
    coefficients: tuple[tuple[float, float, float], ...],
    dtype: torch.dtype,
    acc: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """The iteration of :func:`fast_spectral_power` on one matrix ``(m, n)`` (its per-matrix factors as
    Python floats, on the CPU; the result written into ``out`` where given, a contiguous ``(m, n)`` in
    the working dtype) or a batch ``(B, m, n)`` (factors as ``(B, 1, 1)`` tensors)."""
    T, m = len(coefficients), X.size(-2)
    host = X.ndim == 2 and host_path(X.device)

    # The working copy: X cast to the working dtype (its own layout: a transposed view stays one, as
    # in torch.optim.Muon). The normalisation below comes from the Gram matrix, so any scale of X
    # works as long as its products neither over- nor underflow: where max |X_ij| lies in
    # [FAST_PLAIN_MIN, FAST_PLAIN_MAX] (or X is not finite: the caller's check refuses it) nothing
    # more is done; elsewhere X is first scaled by an exact power of two to max |X_ij| in [1/2, 1)
    # (on accelerators, see below, subnormal matrices end lower).
    if host:
        Xw = X.to(dtype)
        e = _plain_exponent(Xw, X)
        if e is not None:
            Xw = _times_pow2(X, -e).to(dtype)
    else:
        # accelerators, compiled steps: always prescaled (the range check would need a host read), by the
        # exact power of two 2^-e of pow2_exponent (clamped there so that 2^-e is a normal number: a
        # matrix of float32 (bfloat16, float16) subnormals ends at max |X_ij| >= 2^-22 (2^-6, 2^-9),
        # inside [FAST_PLAIN_MIN, 1), float64 ones at >= 2^-51, whose products float64 work holds),
        # applied in the wider of X's and the accumulation dtype and written straight in the working
        # dtype: seven kernels (on a GPU no float32 temporary). Exact, so a bfloat16 X (a bfloat16
        # momentum) is not rounded twice. The norm comes back below through the factor 2^(e p).
        wide = torch.promote_types(X.dtype, acc)
        e_wide = pow2_exponent(X).to(wide)
        factor = torch.exp2(e_wide.neg())
        if torch.compiler.is_compiling():  # fused there anyway (and a strided out= would break the graph)
            Xw = (X * factor).to(dtype)
        else:
            Xw = torch.mul(X, factor, out=torch.empty_like(X, dtype=dtype))
        e = None

    # Normalisation on the m x m side, in the working dtype, from the first step's own products:
    # A = X X^T gives the Frobenius norm (its trace); A_f = A / ||X||_F^2 and A_f^2 give the Schatten-8
    # bound r2 = ||A_f^2||_F^(1/2) = (sum x^8)^(1/4) >= x_max^2 of X / ||X||_F (and x_max^2 >= 1/m since
    # sum x^2 = 1; the floor also keeps a zero matrix at zero). The map sees X_0 = k X with
    # k = 1 / ||X||_S8 = (||X||_F^2 r2)^(-1/2), never formed: k goes into step 1's m x m matrix and into
    # the output weights; ||X||_S8^p restores the raw spectrum (on the host in float64: with the
    # prescale, the power of two may be far outside float32's range; batched, from in-range factors).
    A = gram(Xw)
    fro2 = (
        A.diagonal(dim1=-2, dim2=-1)
        .sum(-1, keepdim=True, dtype=acc)[..., None]
        .clamp_min(torch.finfo(acc).tiny)
    )
    A_n = None  # A / ||X||_F^2 in float32 (per-matrix factors)
    if host:
        fro2 = float(fro2)
        # the factor 1 / ||X||_F^4 goes into the product's float32 accumulator: no scaling pass over A
        # (FAST_PLAIN_MAX keeps the raw products in range; 0 only for a zero X, where A = 0)
        inv = 1.0 / (fro2 * fro2) if fro2 > 2.0**-60 else 0.0
        A_f2 = torch.addmm(A.new_zeros(()), A, A, beta=0.0, alpha=inv)
    else:
        # for step 1's matrix below; rounded to the working dtype for the product (divided in place on
        # A's float32 copy, then A's last use: the same bits, two m x m temporaries fewer)
        A_n, A = A.to(acc), None
        A_n.div_(fro2)
        A_f = A_n.to(dtype)
        A_f2 = _mm(A_f, A_f)
        del A_f
    a, b, c = coefficients[0]
    # the output's pivot w_j: the first of w_1..w_{T-1} that is not 0 (1 where there is none; see below)
    pivot = 1.0
    for t in range(1, T):  # a loop, not next(generator, default): torch 2.5's dynamo cannot trace that
        if w[t] != 0.0:
            pivot = w[t]
            break
    if not host:
        # per-matrix factors, (B, 1, 1) each, from one exp2 (see _batched_factors)
        c1, c2, c3, f0, scale = _batched_factors(fro2, A_f2, e_wide, m, p, (a, b, c), w[0], pivot, acc, dtype)
    else:
        r2 = float(torch.linalg.vector_norm(A_f2, dim=(-2, -1), dtype=acc).sqrt().clamp_min(1.0 / m))
        q = fro2 * r2  # ||X_w||_S8^2
        k = q**-0.5
        if p == 0.0:
            scale = 1.0
        elif e is None:
            scale = min(2.0 ** (0.5 * p * math.log2(q)), torch.finfo(acc).max)
        else:
            log2_norm = 0.5 * math.log2(q) + float(e)  # the prescale's power of two may be far out of range
            scale = min(2.0 ** min(p * log2_norm, 1023.0), torch.finfo(acc).max)
        f0 = k * (w[0] / pivot)

    # Step 1's matrix B_1 = k (a I + b A_0 + c A_0^2) with A_0 = A_f / r2, the Gram matrix of X_0: acts
    # on X itself (X_1 = B_1 X). Later steps: B_t = a I + b A_{t-1} + c A_{t-1}^2 from their own Gram
    # matrix. The a term sits on the diagonal, so a step is ONE plain product (cheaper than the
    # fused-axpy form on CPUs, and no elementwise pass over the iterate).
    # It is formed in float32 and rounded once: its terms cancel (e.g. 4.8 - 12.0 x^2 + 7.8 x^4 for
    # fast5), so a bfloat16 sum would lose the small eigenvalues near x = 1.
    if host and c != 0.0:
        # B_1 = s (A_f^2 + (b r2 / (c ||X||_F^2)) A + (a r2^2 / c) I) with s = k c / r2^2: three passes
        # (the bfloat16 A is read by the float32 add as it is; the last pass scales and rounds)
        B = A_f2.to(acc)
        B.add_(A, alpha=b * r2 / (c * fro2))
        _add_diagonal_(B, a * r2 * r2 / c)
        B = torch.mul(B, k * c / (r2 * r2), out=torch.empty_like(A))
    else:
        # the same three terms with per-matrix factors: (k c / r2^2) A_f^2 + (k b / r2) A_f + k a I (A_f
        # normalised first: a factor k b / (r2 ||X||_F^2) alone can overflow float32 where k is large)
        if A_n is None:  # CPU, c = 0 (host factors)
            B = A_f2.to(acc) * (k * c / (r2 * r2))
            _axpy_(B, A.to(acc) / fro2, k * b / r2)
            _add_diagonal_(B, k * a)
        else:  # in place on A_n, its last use: no m x m float32 buffer of its own (on CUDA the
            # bfloat16 A_f^2 is read as it is; on CPU torch copies it to float32 for the kernel)
            B, A_n = A_n.mul_(c2), None
            _axpy_(B, A_f2, c1)
            _add_diagonal_(B, c3)
        B = B.to(dtype)
    del A, A_f2, A_n

    # The output sum O = scale sum_t w_t X_t, in the working dtype, kept relative to a pivot term
    # w_j X_j (the first step with w_j != 0): S = X_j + sum_{t != j} (w_t / w_j) X_t. Its first pass also
    # reads X_0 (no pass of its own; contiguous even where X_0 is a transposed view), each later term is
    # one scaled add, and the last two terms and the factor scale w_j go into the sum's product:
    # O = scale w_j S + scale w_T (B_T + (w_{T-1} / w_T) I) X_{T-1} (one addmm; X_{T-1}'s own term rides
    # on the diagonal of the m x m matrix, where B_T's a_T already sits: no pass of its own).
    X_prev, S, fold = Xw, None, 0.0
    for t in range(1, T + 1):
        if t > 1:
            a, b, c = coefficients[t - 1]
            G = gram(X_prev)
            B = _addmm(G, G, G, beta=b, alpha=c)  # b A + c A^2
            del G  # freed before the product allocates the next iterate
            _add_diagonal_(B, a + fold)  # fold != 0 only at t = T
        if t == T:
            if S is None:  # no pivot (one step, or w_1..w_{T-1} all zero): X_0's term here
                S = _scaled(Xw, f0, out)
            if isinstance(scale, Tensor):  # per-matrix (already times the pivot): the product into S
                accumulate_ = S.addmm_ if S.ndim == 2 else S.baddbmm_  # (host ratio), then one scaling
                return accumulate_(B, X_prev, alpha=w[T] / pivot).mul_(scale)
            return _sum_product(S, B, X_prev, scale * pivot, scale * w[T])
        X_t = _mm(B, X_prev)
        if S is not None and t == T - 1 and w[T] != 0.0:
            fold = w[t] / w[T]
        elif S is not None:
            S.add_(X_t, alpha=w[t] / pivot)
        elif w[t] != 0.0:  # the pivot step
            if host and Xw.stride(-1) != 1:
                # X_0 is a transposed view (a tall matrix): torch's elementwise kernels read it ~9x slower
                # than a contiguous operand (a 512 x 1376 bfloat16 add: 0.95 ms against 0.10, AMD EPYC
                # Zen 5), its transposing copy is a blocked kernel (0.22 ms): copy, then add in place.
                # The same sum; with bfloat16 work the contiguous kernel rounds ~6% of the entries one
                # ulp otherwise (a relative 1.5e-3 on the output), as it does for wide matrices
                S = out.copy_(Xw) if out is not None else Xw.contiguous()
                S = torch.add(X_t, S, alpha=f0, out=S)
            else:
                S = _add_scaled(X_t, Xw, f0, out)
            Xw = None  # X_0's last use: its memory is free for the later iterates
        X_prev = X_t
    raise AssertionError("unreachable")  # pragma: no cover


#: Range of ``max |X_ij|`` in which :func:`fast_spectral_power` skips the power-of-two prescale. The
#: CPU path squares the raw Gram matrix in the product's float32 accumulator (entries up to
#: ``max|X_ij|^4 n^2 m <= 2^48 n^2 m``: in range for ``n^2 m < 2^79``, any matrix that fits in memory);
#: at the low end the Gram matrix and its square stay above float32's normal range (``>= 2^-96``).
FAST_PLAIN_MIN = 2.0**-24
FAST_PLAIN_MAX = 2.0**12


def _plain_exponent(Xw: Tensor, X: Tensor) -> Tensor | None:
    """``None`` where X needs no prescale, else the per-matrix exponent of
    :func:`htmuon.spectral.pow2_exponent` of X (always, with float16 work).

    On CPU, eager, one ``aminmax`` of the working copy ``Xw`` decides for the whole batch (a value that
    the cast to bfloat16 rounded to infinity is looked up in X itself; a NaN or Inf in X takes the
    plain path, and the caller's finite check refuses it). CPU paths only: on accelerators and in
    compiled steps, where the check would need a host read, X is always prescaled.
    """
    amax = abs_max(Xw)
    # float16 work (a range of 2^16): the raw Gram matrix overflows for max |X_ij| ~ 2^8 / sqrt(n) and the
    # factor 1 / ||X||_S8 of the first output term for ||X||_S8 below 2^-16, so it is always prescaled
    if FAST_PLAIN_MIN <= amax <= FAST_PLAIN_MAX and not narrow_range(Xw.dtype):
        return None
    if math.isinf(amax) and Xw.dtype != X.dtype:
        amax = abs_max(X)
    return pow2_exponent(X, representable=False) if math.isfinite(amax) else None


# Constant tensors of _batched_factors per (constants, p, m, dtype, device): built once, not copied to
# the device at every chunk (a plain dict, as _OUTPUT_WEIGHTS; compiled steps build them in the graph).
_FACTOR_CONSTANTS: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _factor_constants(consts: tuple[float, ...], p: float, m: int, dtype: torch.dtype, device: torch.device):
    """``(coefficients, log2 |constants|, signs, floors)`` of :func:`_batched_factors`."""
    key = (consts, p, m, dtype, device)
    hit = None if torch.compiler.is_compiling() else _FACTOR_CONSTANTS.get(key)
    if hit is not None:
        return hit
    # rows: log2 ||X_w||_F^2, log2 ||A_f^2||_F (= 2 log2 r2), e; columns: k c / r2^2, k b / r2, k a,
    # k w_0 / w_j and ||X||_S8^p w_j, with log2 k = -(log2 ||X_w||_F^2 + log2 r2) / 2
    rows = [
        [-0.5, -0.5, -0.5, -0.5, 0.5 * p],
        [-1.25, -0.75, -0.25, -0.25, 0.25 * p],
        [0.0, 0.0, 0.0, 0.0, p],
    ]
    coefficients = torch.tensor([row[: len(consts)] for row in rows], dtype=dtype, device=device)
    logs = torch.tensor([math.log2(abs(x)) if x else -math.inf for x in consts], dtype=dtype, device=device)
    signs = torch.tensor([math.copysign(1.0, x) if x else 0.0 for x in consts], dtype=dtype, device=device)
    # r2 >= 1/m: ||A_f^2||_F >= m^-2 (the floor also keeps a zero matrix at zero)
    floors = torch.tensor([-math.inf, -2.0 * math.log2(m), -math.inf], dtype=dtype, device=device)
    out = (coefficients, logs, signs, floors)
    if not torch.compiler.is_compiling() and len(_FACTOR_CONSTANTS) < 1024:
        _FACTOR_CONSTANTS[key] = out
    return out


def _batched_factors(
    fro2: Tensor,
    A_f2: Tensor,
    e: Tensor,
    m: int,
    p: float,
    abc: tuple[float, float, float],
    w0: float,
    pivot: float,
    acc: torch.dtype,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | float]:
    """The per-matrix factors of a batch's first step and output, ``(B, 1, 1)`` each (``(1, 1)`` for
    one matrix).

    Every factor is a signed power of two of a linear form in ``log2 ||X_w||_F^2``, ``log2 r2`` and the
    prescale's exponent ``e``: ``k c / r2^2``, ``k b / r2``, ``k a`` (for step 1's matrix, in ``acc``),
    ``k w_0 / w_j`` (the output sum's first term) and ``||X||_S8^p w_j = 2^(p (log2 q) / 2 + p e) w_j``
    (its final scale; ``1.0`` where ``p = 0``), the last two in the working dtype, in which they
    multiply the iterates. So they come from one small product and one ``exp2``: about 10 kernels,
    where taking the products, powers and quotients one by one was about 20, each a launch on a GPU.
    The log-domain form adds a relative error of about ``1e-6`` to each factor (float32), far below
    the bfloat16 rounding of the two that meet the iterates, which a mixed-dtype kernel would not
    save: on CPU it copies each chunk-sized operand to float32 first (BENCHMARKS.md §A-11). A result
    beyond the dtype's range is capped at its largest value (the true result is out of range too).
    """
    a, b, c = abc
    consts = (c, b, a, w0 / pivot) + ((pivot,) if p else ())
    coefficients, logs, signs, floors = _factor_constants(consts, p, m, acc, fro2.device)
    norm = torch.linalg.vector_norm(A_f2, dim=(-2, -1), keepdim=True, dtype=acc)
    L = torch.cat([torch.cat([fro2, norm], dim=-1).log2(), e.to(acc)], dim=-1).view(-1, 3)
    L = torch.maximum(L, floors)
    F = torch.addmm(logs, L, coefficients).exp2_().mul_(signs).clamp_max_(torch.finfo(acc).max)
    F = F.view(*fro2.shape, len(consts))  # (B, 1, 1, K), or (1, 1, K) for one matrix
    tail = F[..., 3:].to(dtype)
    return F[..., 0], F[..., 1], F[..., 2], tail[..., 0], tail[..., 1] if p else 1.0


def _scaled(x: Tensor, f: float | Tensor, out: Tensor | None = None) -> Tensor:
    """``x * f`` in x's dtype (``f`` a float or a per-matrix ``(B, 1, 1)`` tensor), into ``out`` if given."""
    if isinstance(f, float) and out is None:
        return x * f
    return torch.mul(x, f, out=torch.empty_like(x) if out is None else out)


def _axpy_(out: Tensor, x: Tensor, f: float | Tensor) -> None:
    """``out += f x`` in place (``f`` a float or a per-matrix ``(B, 1, 1)`` tensor)."""
    if isinstance(f, float):
        out.add_(x, alpha=f)
    else:
        out.addcmul_(x, f)


def _add_scaled(x: Tensor, y: Tensor, f: float | Tensor, out: Tensor | None = None) -> Tensor:
    """``x + f y`` in x's dtype and layout (``f`` a float or a per-matrix ``(B, 1, 1)`` tensor), into
    ``out`` if given."""
    if isinstance(f, float):
        return torch.add(x, y, alpha=f, out=out)
    return torch.addcmul(x, y, f, out=torch.empty_like(x) if out is None else out)


def _add_diagonal_(B: Tensor, f: float | Tensor) -> None:
    """``B += f I`` in place (per matrix)."""
    diag = B.diagonal(dim1=-2, dim2=-1)
    if isinstance(f, float):
        diag.add_(f)
    else:
        diag.add_(f.reshape(*f.shape[:-2], 1))


def _sum_product(S: Tensor, B: Tensor, X: Tensor, beta: float, alpha: float) -> Tensor:
    """``beta S + alpha B X`` with host factors, as ``beta (S + (alpha / beta) B X)``: one ``addmm`` with
    ``beta=1`` and then one scaling pass. A per-call ``beta`` in ``addmm`` would be slower: on CPU, oneDNN
    builds a new kernel for each value of its ``beta`` (~10 ms for a 512 x 1376 bfloat16 product,
    measured), while ``alpha`` is a runtime argument. (Per-matrix factors: the same form, in
    :func:`_fast_iteration`.)
    """
    if S.ndim == 2 or not host_path(S.device):  # in place: S is the output's own buffer
        if beta == 0.0:
            return torch.matmul(B, X, out=S).mul_(alpha)
        return (S.addmm_ if S.ndim == 2 else S.baddbmm_)(B, X, alpha=alpha / beta).mul_(beta)
    if beta == 0.0:
        return _mm(B, X).mul_(alpha)
    return _addmm(S, B, X, beta=1.0, alpha=alpha / beta).mul_(beta)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D or batched operands (on CPU, eager, one 2-D product per matrix, as :func:`gram`)."""
    if a.ndim == 3 and not host_path(a.device):
        return torch.bmm(a, b)  # as ``a @ b`` (the same kernel), without matmul's four views
    if a.ndim != 3 or not host_path(a.device):
        return a @ b
    out = torch.empty(a.shape[0], a.shape[1], b.shape[-1], dtype=b.dtype, device=b.device)
    for i in range(a.shape[0]):
        torch.mm(a[i], b[i], out=out[i])
    return out


register_backend(
    "fast",
    functools.partial(fast_spectral_power, coefficients=FAST6_COEFFICIENTS),
    spectra=("power",),
    options=("compute_dtype", "ns_dtype"),
    scale_safe=True,
    description="6 fitted quintic Newton-Schulz steps, output = weighted sum of iterates (~1.2x Muon)",
)
register_backend(
    "fast5",
    functools.partial(fast_spectral_power, coefficients=FAST5_COEFFICIENTS),
    spectra=("power",),
    options=("compute_dtype", "ns_dtype"),
    scale_safe=True,
    description="5 fitted quintic Newton-Schulz steps, weighted sum of iterates (Muon's matmul count)",
)
