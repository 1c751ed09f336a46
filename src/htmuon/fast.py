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

Normalisation. The iteration needs singular values in (0, 1]. One fresh pass over the matrix
scales it by a power of two to ``max |X_ij|`` in [1/2, 1) (exact, and safe for every finite input:
no norm or product can over- or underflow); ``A = X X^T`` of it and ``A^2``, both needed by the
first step anyway, then give the Frobenius norm (the trace of ``A``) and the Schatten-8 norm for
free: ``r2 = ||A^2||_F^(1/2) = (sum x^8)^(1/4) >=
x_max^2``, a bound within ``m^(1/8)`` of ``x_max`` instead of the Frobenius norm's ``m^(1/2)``
(about one decade of spectrum gained); ``X`` is rescaled in place and ``A, A^2`` on the ``m x m``
side. The map sees ``x = s / ||X||_S8``; the raw spectrum is restored exactly by the factor
``||X||_S8^p`` (one multiply of the output sum, computed in float64 from the power of two):
``U s^p V^T = ||X||_S8^p U x^p V^T``.

Cost. Each step is ONE product of the iterate: ``X_t = (a_t I + b_t A + c_t A^2) X_{t-1}`` (the ``a_t``
term on the diagonal of the ``m x m`` polynomial), i.e. Muon's three products and no elementwise
pass over the ``m x n`` iterate; the output sum takes one scalar axpy per step (float32), the raw
scale one multiply at the end. With bfloat16 work the iterate lives in bfloat16 as in Muon.

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

from .spectral import _addmm, gram, ns_working_dtype, pow2, pow2_exponent, register_backend

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
# grid, ridge) and the script's FIT_EXPONENTS = (0, 1/16, 1/8, 1/4, 1/2), iterate bound 1.25.
# `python scripts/fit_fast_coefficients.py --steps 6 --runs 9 --check` re-runs the winning run
# alone and compares *objectives* (the fit is non-convex: another CPU or BLAS lands on other
# coefficients of similar quality); tests/test_fast.py does so.
#: How each set was obtained: the winning run of the fit and its objective (mean RMS relative error).
FAST_FIT_PROVENANCE: dict[str, dict[str, float]] = {
    "fast": {"steps": 6, "seed": 0, "run": 9, "objective": 0.017032},
    "fast5": {"steps": 5, "seed": 0, "run": 4, "objective": 0.079287},
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
    (4.756645146977647, -11.952616241798026, 7.831277803721966),
    (4.196662265723349, -7.801429395472532, 3.813228602236863),
    (4.122974302159154, -7.375818958223743, 3.393623640408844),
    (3.2119411174162367, -5.182529301854524, 2.33713172128056),
    (1.9286232356625086, -3.8102859058374157, 2.1090829258546),
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


@functools.lru_cache(maxsize=1024)
def output_weights(p: float, coefficients: tuple[tuple[float, float, float], ...]) -> tuple[float, ...]:
    """Weights ``w_0..w_T`` with ``sum_t w_t f_t(x) ~ x**p`` on ``[FAST_DOMAIN_LO, 1]`` (cached per ``p``)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Invalid exponent p: {p!r} (must be in [0, 1])")
    x = fit_grid()
    w = solve_output_weights(scalar_iterates(coefficients, x), x, p)
    return tuple(float(v) for v in w)


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
        ns_dtype: working dtype as for :func:`htmuon.polar`: ``"auto"`` (bfloat16 on CUDA, float32
            elsewhere), a ``torch.dtype``, or ``None`` (X's dtype).

    Returns:
        ``(B, m, n)``; float32 (float64 when the working dtype is float64).
    """
    if spectrum != "power":  # pragma: no cover - the dispatch checks the backend's spectra
        raise ValueError(f"the fast backend supports spectrum='power' only, got {spectrum!r}")
    dtype = compute_dtype or ns_working_dtype(ns_dtype, X.device) or X.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if p == 1.0:
        return X.to(acc)
    w = output_weights(float(p), tuple(tuple(c) for c in coefficients))
    T, m = len(coefficients), X.size(-2)
    fused = dtype == acc  # float32/float64 work: iterate and output sum in one dtype
    X_in = X

    # Normalisation, safe for any finite X: an exact power-of-two scaling to max |X_ij| in [1/2, 1)
    # (Muon's X / ||X||_F pass), then the Frobenius and Schatten-8 norms from the first step's own
    # products on the m x m side (A = X X^T and A^2 are step 1's products anyway).
    e = pow2_exponent(X_in)
    buf = _scaled_cast(X_in, pow2(-e, torch.float64), acc)  # exact; contiguous even for a transposed X
    X = buf if fused else buf.to(dtype)
    A = gram(X).to(acc)
    fro2 = A.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(torch.finfo(acc).tiny)
    A = A / fro2  # the Gram matrix of X / ||X||_F
    Am = A if fused else A.to(dtype)
    A2 = (Am @ Am).to(acc)
    # Schatten-8 bound: r2 = ||A^2||_F^(1/2) >= x_max^2 (and x_max^2 >= 1/m since sum x^2 = 1; the floor
    # also keeps a zero matrix at exactly zero). The map sees x = s / ||X||_S8 in (0, 1]; the output
    # sum times ||X||_S8^p restores the raw spectrum, ||X||_S8 = 2^e sqrt(fro2 r2), in float64 (2^e
    # may be far outside float32's range).
    r2 = A2.norm(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1.0 / m)
    k = (fro2 * r2).rsqrt()
    if p > 0.0:
        log2_norm = e.to(torch.float64) + 0.5 * torch.log2((fro2 * r2).to(torch.float64))
        scale = torch.exp2(p * log2_norm).clamp_max(torch.finfo(acc).max).to(acc)
    else:
        scale = torch.ones_like(r2)
    # X0 = X / ||X||_S8, in place in the float32/float64 buffer (two factors: 2^-e k alone may not be
    # representable); with low-precision work (bfloat16/float16) the iterate lives in the working dtype,
    # as in Muon, cast once from that buffer, and only the output sum is float32 (the buffer, reused).
    buf.mul_(k)
    X = buf if fused else buf.to(dtype)

    # The output sum O = sum_t w_t X_t with the scalar weights w_t (one scalar axpy per step, the
    # cheapest elementwise pass, also in mixed dtypes), times the per-matrix raw scale at the end.
    out = None
    for t, (a, b, c) in enumerate(coefficients, start=1):
        # Step t as ONE plain product: X_t = (a I + b A + c A^2) X_{t-1}. The m x m polynomial takes the
        # a X term on its diagonal, so neither a fused-axpy matmul (1.0-1.2x a plain bfloat16 product on
        # an AMX CPU) nor an elementwise pass over the m x n iterate is needed.
        if t == 1:  # step 1's A, A^2 are the normalisation's, rescaled on the m x m side
            B = torch.addcmul(A2 * (c / r2.square()), A, b / r2)
        else:
            A = gram(X)
            B = _addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        B.diagonal(dim1=-2, dim2=-1).add_(a)
        if out is None and t == T:  # a single step: X_0 is still needed, no in-place start
            out = buf * w[0]
        if t == T:  # the last term, w_T X_T = (w_T B_T) X_{T-1}, straight into the sum
            Bw = (B * w[T]).to(X.dtype)
            if fused:
                _addmm_(out, Bw, X)
            else:
                out.add_(Bw @ X)
            break
        Xn = B.to(X.dtype) @ X
        if out is None:  # the output sum starts as w_0 X_0
            out = buf.mul_(w[0])  # X_0 (float32/float64) is not needed any more
        out.add_(Xn, alpha=w[t])
        X = Xn
    return out.mul_(scale) if p > 0.0 else out


def _scaled_cast(X: Tensor, factor: Tensor, dtype: torch.dtype) -> Tensor:
    """``(X * factor).to(dtype)`` for a per-matrix ``factor``, computed in the wider of X's dtype and
    ``dtype`` (float32 for a bfloat16 X), so that neither the product nor the cast over- or underflows
    for a factor of safe size."""
    work = torch.promote_types(X.dtype, dtype)
    # into a fresh contiguous buffer: a transposed (tall) input would otherwise give every later
    # product and pass a strided operand
    buf = torch.empty(X.shape, dtype=work, device=X.device)
    return torch.mul(X, factor.to(work), out=buf).to(dtype)


def _addmm_(c: Tensor, a: Tensor, b: Tensor) -> None:
    """``c += a @ b`` in place (2-D or batched)."""
    if a.ndim == 2:
        c.addmm_(a, b)
    else:
        c.baddbmm_(a, b)


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
