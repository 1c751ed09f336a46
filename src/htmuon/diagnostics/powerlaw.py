"""Power-law fit of an empirical spectral density (ESD): the heavy-tail exponent ``alpha``.

Given the eigenvalues ``lambda`` of ``W^T W`` (the squared singular values of a weight matrix),
heavy-tailed self-regularisation (HT-SR) fits the tail ``p(lambda) ~ lambda^-alpha`` for
``lambda >= xmin`` by maximum likelihood (the Hill estimator)::

    alpha(xmin) = 1 + n / sum_{lambda_j >= xmin} ln(lambda_j / xmin)          (n = tail size)

and measures the fit by the Kolmogorov--Smirnov distance between the fitted tail CDF
``1 - (lambda / xmin)^(1 - alpha)`` and the empirical one. Three choices of ``xmin`` are offered
(:data:`FITS`):

``"ks"`` (default)
    WeightWatcher's default: every eigenvalue but the largest is a candidate ``xmin``; the one with
    the smallest KS distance wins (first one on ties). With fewer than :data:`SMALL_N_CUTOFF`
    eigenvalues WeightWatcher 0.7.7 switches to a small-sample rule, reproduced here: only tails
    of at least :data:`SMALL_N_MIN_TAIL` eigenvalues are candidates, ``alpha`` gets the ``n - 1``
    bias correction, and the smallest ``D`` wins (WeightWatcher's small-sample code ranks by
    ``D - 0.868 / sqrt(n)``, but its constructor re-selects by ``D``, and that is what it reports).
``"median"``
    The HTMuon paper's estimator default (``xmin_mid``): ``xmin`` is the eigenvalue at index
    ``N // 2`` of the sorted ESD, i.e. the tail is the upper half. Gives markedly lower alphas
    than ``"ks"`` on the same matrices; say which fit a number came from.
``"fix-finger"``
    The ``xmin_peak`` rule (WeightWatcher's ``fix_fingers='xmin_peak'``, broken in 0.7.7; the
    paper's estimator option): restrict the KS search to ``0.95 * peak <= xmin <= 1.5 * peak``,
    where ``peak`` is the left edge of the fullest of 100 equal bins of ``log10(lambda)``. This
    keeps a few outlying eigenvalues (a "finger") from dragging ``xmin`` up and ``alpha`` to
    spuriously large values. Both upstream versions compare the lower bound in log space by
    mistake (so in effect only the upper bound acts); here both bounds act, in linear space. A
    window with no candidate, or only degenerate ones (see below), falls back to every xmin, as
    the upstream window, open below, in effect does; the status says so.

All three ignore eigenvalues ``<= thresh`` (WeightWatcher's ``EVALS_THRESH = 1e-5``) and compute
in float64 on the eigenvalues' device (float32 where the device has no float64). The KS search is
vectorised over candidates (in row chunks, so memory stays bounded for large ESDs).

Degenerate spectra. A tail whose eigenvalues are all equal is no power law: its Hill estimate is
``alpha = inf``. Equal *to within rounding* is no better: an orthogonal matrix (``nn.init.orthogonal_``,
an identity) has eigenvalues ``1 +- O(eps)``, and the Hill estimate ``~ 2 / spread`` is ``~1e6``
(float32) to ``~1e15`` (float64), a number about rounding, not about the layer. So a candidate tail
of ``n`` eigenvalues with ``ln(lambda_max / xmin) <= degenerate_rtol(n, N, weight dtype)`` (the
spread rounding can leave on equal eigenvalues) is not a candidate, under every fit; an ESD with no
other tail (every fit), or whose upper half is such a tail (``"median"``), gets
``status = "failed: degenerate ESD (...)"`` and ``alpha = nan``, which
:attr:`~htmuon.diagnostics.ESDReport.mean_alpha` skips. (WeightWatcher 0.7.7 reports such layers
with their huge alpha: ``~3e6`` for a float32 ``orthogonal_`` 128x128 layer, ``inf`` for an
identity.) Since ``sum ln(x / xmin) <= n ln(lambda_max / xmin)``, the rule only ever removes tails
whose alpha is at least ``1 + 1 / degenerate_rtol(n, N)`` (``1 + (1 - 1/n) / rtol`` under the
small-sample rule): >= 33 for bf16 weights, >= 1.6e4 for float32 ones up to ``N = 4096``, far
outside the range HT-SR reads (2-6); float8 is coarser (a square e4m3 matrix's whole ESD: >= 3).

If ``s_k = s_1 k^-s`` (singular values decaying as a power of their rank) then
``alpha = 1 + 1 / (2 s)``.

References:
    C. H. Martin, M. W. Mahoney, "Implicit self-regularization in deep neural networks",
    JMLR 22 (2021). WeightWatcher 0.7.7 (``WW_powerlaw.WWFit``) for the exact conventions.
    A. Clauset, C. R. Shalizi, M. E. J. Newman, "Power-law distributions in empirical data",
    SIAM Review 51 (2009), for the KS choice of ``xmin``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EVALS_THRESH",
    "FITS",
    "SMALL_N_CUTOFF",
    "SMALL_N_MIN_TAIL",
    "PowerLawFit",
    "degenerate_rtol",
    "fit_powerlaw",
]

#: The xmin choices: WeightWatcher's KS rule, the paper's median rule, the xmin_peak rule.
FITS = ("ks", "median", "fix-finger")
#: Eigenvalues at or below this are left out of the fit (WeightWatcher 0.7.7 ``EVALS_THRESH``).
EVALS_THRESH = 1e-5
#: Below this many eigenvalues the ``"ks"`` fit uses the small-sample rule (WeightWatcher 0.7.7
#: ``WW_powerlaw.SMALL_N_CUTOFF``).
SMALL_N_CUTOFF = 20
#: Smallest tail the small-sample rule considers (WeightWatcher 0.7.7 ``k_min``).
SMALL_N_MIN_TAIL = 8
#: Degenerate-tail guard of the small-sample rule: tails with ``sum ln(x/xmin) <= this`` are skipped.
SMALL_N_DEGENERATE = 1e-12
#: Histogram bins of ``log10(lambda)`` used to locate the ESD's peak for ``"fix-finger"``.
FINGER_BINS = 100
#: ``"fix-finger"`` searches ``xmin`` in ``[lo * peak, hi * peak]`` (WeightWatcher's xmin_peak range).
FINGER_RANGE = (0.95, 1.5)
#: Rows x columns per chunk of the vectorised KS search (bounds the memory to a few tens of MB).
_KS_CHUNK_ELEMS = 1 << 21
#: :func:`degenerate_rtol`'s factors: rounding the weights to their dtype, and the size-N computations.
ROUNDING_FACTOR = 4.0
COMPUTE_FACTOR = 8.0


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`fit_powerlaw`.

    Attributes:
        alpha: the power-law exponent (NaN when the fit failed).
        xmin: start of the fitted tail.
        xmax: the largest eigenvalue.
        D: Kolmogorov--Smirnov distance of the fit on the tail.
        sigma: ``(alpha - 1) / sqrt(n_tail)``, the MLE's standard error.
        n_tail: number of eigenvalues ``>= xmin`` used by the fit.
        num_evals: number of eigenvalues above ``thresh`` (the fitted sample).
        fit: the xmin rule used (one of :data:`FITS`).
        status: ``"ok"``, or ``"failed: <why>"``, or ``"ok (<note>)"``.
    """

    alpha: float
    xmin: float
    xmax: float
    D: float
    sigma: float
    n_tail: int
    num_evals: int
    fit: str
    status: str = "ok"


def degenerate_rtol(
    n: int,
    N: int | None = None,
    weight_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> float:
    """Spread ``ln(max / min)`` within which ``n`` eigenvalues of an ``N x M`` matrix count as equal.

    ``rtol = 4 sqrt(n / N) eps_w + 8 sqrt(N) (min(eps_w, eps_float32) + eps_c)``, ``eps_w`` the
    machine epsilon of the weights' dtype, ``eps_c`` that of the dtype the eigenvalues are computed in:

    * ``4 sqrt(n / N) eps_w``: rounding the weights to their dtype adds ``E`` with
      ``|E_ij| <= u |W_ij|`` (``u = eps_w / 2``). ``n`` equal singular values ``s`` (singular
      vectors ``U_n``, ``V_n``) move by the eigenvalues of the symmetric part of ``U_n^T E V_n``, an
      ``n x n`` matrix whose entries, with independent rounding errors, are of size at most
      ``u s / sqrt(3 N)`` (the entries of ``W`` are at most ``s / sqrt(N)`` in root mean square):
      the eigenvalues ``s^2`` spread by ``~ 4 sqrt(2 / 3) sqrt(n / N) u = 1.6 sqrt(n / N) eps_w``
      relative. A Gaussian layer's ESD spreads by ``~ 4 sqrt(M / N)``, ``1 / eps_w`` times more, at
      every shape.
    * ``8 sqrt(N) (...)``: the size-``N`` computations that made the weights (a QR, a Newton--Schulz
      iteration: in float32 at least, however the result is stored) and that compute the
      eigenvalues (``svdvals``, the Gram matrix's ``eigvalsh``) leave ``~ sqrt(N) eps`` (rounding
      errors' statistical growth).

    Measured on ``nn.init.orthogonal_`` layers (300 seeds for 8 <= M <= N <= 64, 3 up to 4096, every
    ``method`` and compute dtype): the whole ESD's spread is at most 0.64 ``rtol`` for float32 and
    float64 weights, 0.43 for bf16, fp16 and float8; every tail is within its own ``rtol`` too, so
    every fit fails. On trained layers (tests/data's models, small MLPs trained with Muon, HTMuon,
    AdamW) and Gaussian ones (8x8 to 50000x8), in float32, bf16, fp16 and float64, no fit changes.

    Args:
        n: how many eigenvalues (a tail's size; ``M * rf`` for a whole ESD).
        N: the matrix's larger side (default ``n``: a square matrix, the largest rounding term).
        weight_dtype: the weights' dtype (default float32: WeightWatcher's working precision, and
            that of nearly every trained model).
        compute_dtype: the eigenvalues' dtype.

    Example:
        >>> f"{degenerate_rtol(128, 128, torch.float32):.1e}"    # float32 weights, float64 eigenvalues
        '1.1e-05'
        >>> f"{degenerate_rtol(128, 128, torch.bfloat16):.3f}"
        '0.031'
    """
    scale, floor = _tolerance(n if N is None else N, weight_dtype, compute_dtype)
    return scale * math.sqrt(max(n, 0)) + floor


def _tolerance(N: int, weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> tuple[float, float]:
    """``(a, b)`` with ``degenerate_rtol(n, N, ...) = a sqrt(n) + b``."""
    eps_w = torch.finfo(weight_dtype).eps
    eps_a = min(eps_w, torch.finfo(torch.float32).eps)
    eps_c = torch.finfo(compute_dtype).eps
    N = max(int(N), 1)
    return ROUNDING_FACTOR * eps_w / math.sqrt(N), COMPUTE_FACTOR * math.sqrt(N) * (eps_a + eps_c)


def _check_fit(fit: str) -> str:
    if fit not in FITS:
        raise ValueError(f"Invalid fit: {fit!r}; expected one of {', '.join(map(repr, FITS))}")
    return fit


def _fit_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _suffix_sums(v: Tensor) -> Tensor:
    """``out[i] = sum(v[i:])``."""
    return torch.flip(torch.cumsum(torch.flip(v, (0,)), 0), (0,))


def _ks_distances(x: Tensor, logx: Tensor, idx: Tensor, alpha: Tensor, n: Tensor) -> Tensor:
    """KS distance of the power-law tail fit at every candidate ``xmin = x[idx]``.

    ``D_i = max_{j >= i} |1 - (x_j / x_i)^(1 - alpha_i) - (j - i) / n_i|`` for sorted ``x``;
    computed in row chunks over the candidates, columns restricted to ``j >= min(idx_chunk)``.
    """
    N = x.numel()
    out = torch.empty_like(alpha)
    if idx.numel() == 0:
        return out
    rows_per_chunk = max(1, _KS_CHUNK_ELEMS // N)
    for a in range(0, idx.numel(), rows_per_chunk):
        rows = idx[a : a + rows_per_chunk]
        start = int(rows[0])
        cols = torch.arange(start, N, device=x.device)
        gap = (cols[None, :] - rows[:, None]).to(x.dtype)  # j - i
        log_ratio = logx[None, start:] - logx[rows][:, None]  # ln(x_j / x_i)
        expo = (1.0 - alpha[a : a + rows_per_chunk])[:, None]
        diff = (1.0 - torch.exp(expo * log_ratio) - gap / n[a : a + rows_per_chunk, None]).abs()
        diff = diff.masked_fill(gap < 0, 0.0)
        out[a : a + rows_per_chunk] = diff.amax(dim=1)
    return out


def _candidates(x: Tensor, logx: Tensor, idx: Tensor, bias: float) -> tuple[Tensor, Tensor, Tensor]:
    """Hill estimates at candidates ``idx``: returns (n_i, s_i = sum ln(x_j / x_i), alpha_i)."""
    N = x.numel()
    n = (N - idx).to(x.dtype)
    s = _suffix_sums(logx)[idx] - n * logx[idx]
    alpha = 1.0 + (n - bias) / s
    return n, s, alpha


def _finger_window(x: Tensor, bins: int = FINGER_BINS) -> tuple[float, float]:
    """``(lo, hi)`` xmin window around the peak of the histogram of ``log10(x)``."""
    lx = torch.log10(x)
    lo, hi = float(lx[0]), float(lx[-1])
    if hi <= lo:
        peak = lo
    else:
        width = (hi - lo) / bins
        b = ((lx - lo) / width).floor().clamp_(0, bins - 1).long()
        counts = torch.bincount(b, minlength=bins)
        peak = lo + int(torch.argmax(counts)) * width
    return FINGER_RANGE[0] * 10.0**peak, FINGER_RANGE[1] * 10.0**peak


def check_thresh(thresh: float) -> None:
    """A ValueError naming ``thresh`` unless it is a finite real >= 0 (a negative one lets zero
    eigenvalues, whose log is -inf, into the fit; NaN leaves every eigenvalue out)."""
    if isinstance(thresh, bool) or not isinstance(thresh, numbers.Real) or not (0 <= thresh < math.inf):
        raise ValueError(
            f"Invalid thresh: {thresh!r}; expected a finite number >= 0 (default {EVALS_THRESH:g})"
        )


def fit_powerlaw(
    evals: Tensor,
    fit: str = "ks",
    *,
    thresh: float = EVALS_THRESH,
    N: int | None = None,
    weight_dtype: torch.dtype = torch.float32,
) -> PowerLawFit:
    """Fit ``p(lambda) ~ lambda^-alpha`` to the tail of an ESD, choosing ``xmin`` by ``fit``.

    Args:
        evals: 1-D tensor of eigenvalues of ``W^T W`` (any order, any device).
        fit: the xmin rule, one of :data:`FITS` (see the module docstring).
        thresh: eigenvalues ``<= thresh`` are ignored.
        N, weight_dtype: the larger side and the dtype of the matrix the eigenvalues come from
            (default: square, float32), which set how close eigenvalues must be to count as equal
            (:func:`degenerate_rtol`; a degenerate tail, see the module docstring).
            :func:`~htmuon.diagnostics.analyze` passes each layer's own.

    Returns:
        A :class:`PowerLawFit`. A fit that cannot be made (fewer than two eigenvalues above
        ``thresh``, or a degenerate ESD) is returned with ``alpha = nan`` and
        ``status = "failed: ..."``; it does not raise.

    Example:
        >>> s = torch.arange(1, 513, dtype=torch.float64) ** -0.5     # s_k ~ k^-1/2 -> alpha = 2
        >>> round(fit_powerlaw(s**2).alpha, 1)
        2.0
    """
    _check_fit(fit)
    if not isinstance(evals, Tensor):
        evals = torch.as_tensor(evals)
    if evals.ndim != 1:
        raise ValueError(f"evals must be a 1-D tensor of eigenvalues, got shape {tuple(evals.shape)}")
    if not bool(torch.isfinite(evals).all()):
        raise ValueError("evals contain NaN or Inf")
    if N is not None and (isinstance(N, bool) or not isinstance(N, int) or N < 1):
        raise ValueError(f"Invalid N: {N!r}; expected an int >= 1 (the matrix's larger side)")
    if not (isinstance(weight_dtype, torch.dtype) and weight_dtype.is_floating_point):
        raise ValueError(f"Invalid weight_dtype: {weight_dtype!r}; expected a floating-point torch.dtype")
    check_thresh(thresh)
    compute = evals.dtype if evals.is_floating_point() else torch.float64
    tol = _tolerance(N or evals.numel(), weight_dtype, compute)
    x = evals.to(_fit_dtype(evals.device))
    x = torch.sort(x[x > thresh]).values
    n_ev = x.numel()
    xmax = float(x[-1]) if n_ev else float("nan")
    if n_ev < 2:
        why = f"failed: {n_ev} eigenvalue(s) above {thresh:g}, need at least 2"
        return PowerLawFit(math.nan, math.nan, xmax, math.nan, math.nan, 0, n_ev, fit, why)
    logx = torch.log(x)
    status = "ok"

    if fit == "median":
        i = n_ev // 2
        if n_ev - i < 2:  # two eigenvalues (a rank-2 layer): a tail of one has no Hill estimate
            why = (
                f"failed: {n_ev} eigenvalues above {thresh:g}: the median fit's tail (the upper half) "
                "would be 1, need at least 2"
            )
            return PowerLawFit(math.nan, float(x[i]), xmax, math.nan, math.nan, n_ev - i, n_ev, fit, why)
        idx = torch.tensor([i], device=x.device)
        n, _, alpha = _candidates(x, logx, idx, bias=0.0)
        D = _ks_distances(x, logx, idx, alpha, n)
        if not bool(_valid(logx, idx, alpha, D, tol)[0]):
            return _failed(x, logx, i, fit, tol, "its upper half (the median fit's tail) is")
        return _result(x, i, float(alpha[0]), float(D[0]), n_ev, fit, status)

    if fit == "ks" and n_ev < SMALL_N_CUTOFF:
        return _fit_small_n(x, logx, fit, tol)

    idx = torch.arange(n_ev - 1, device=x.device)
    if fit == "fix-finger":
        lo, hi = _finger_window(x)
        keep = (x[:-1] >= lo) & (x[:-1] <= hi)
        if bool(keep.any()):
            n, _, alpha = _candidates(x, logx, idx[keep], bias=0.0)
            D = _ks_distances(x, logx, idx[keep], alpha, n)
            valid = _valid(logx, idx[keep], alpha, D, tol)
            if bool(valid.any()):
                return _best(x, idx[keep], alpha, D, valid, fit, status)
            status = "ok (fix-finger window holds only degenerate tails: used every xmin)"
        else:
            status = "ok (fix-finger window empty: used every xmin)"
    n, _, alpha = _candidates(x, logx, idx, bias=0.0)
    D = _ks_distances(x, logx, idx, alpha, n)
    valid = _valid(logx, idx, alpha, D, tol)
    if not bool(valid.any()):  # candidate 0, the whole ESD, among them
        return _failed(x, logx, 0, fit, tol, "its eigenvalues are")
    return _best(x, idx, alpha, D, valid, fit, status)


def _distinct(logx: Tensor, idx: Tensor, tol: tuple[float, float]) -> Tensor:
    """Candidates whose tail is not degenerate: ``ln(x_max / xmin) > degenerate_rtol(n_tail)``."""
    n = (logx.numel() - idx).to(logx.dtype)
    return (logx[-1] - logx[idx]) > tol[0] * n.sqrt() + tol[1]


def _valid(logx: Tensor, idx: Tensor, alpha: Tensor, D: Tensor, tol: tuple[float, float]) -> Tensor:
    """Candidates that are power-law fits: a tail of eigenvalues equal to within rounding (exactly
    equal: ``sum ln(x / xmin) = 0``, alpha = inf and a NaN distance, which argmin would pick over
    every real candidate) is not one."""
    return _distinct(logx, idx, tol) & (alpha > 1.0) & torch.isfinite(alpha) & torch.isfinite(D)


def _best(
    x: Tensor, idx: Tensor, alpha: Tensor, D: Tensor, valid: Tensor, fit: str, status: str
) -> PowerLawFit:
    """The valid candidate with the smallest KS distance (the first one on ties)."""
    k = int(torch.argmin(torch.where(valid, D, torch.ones_like(D))))
    return _result(x, int(idx[k]), float(alpha[k]), float(D[k]), x.numel(), fit, status)


def _failed(x: Tensor, logx: Tensor, i: int, fit: str, tol: tuple[float, float], what: str) -> PowerLawFit:
    """A degenerate ESD: the tail from ``x[i]`` is equal to within rounding (the status says how close)."""
    N = x.numel()
    spread = float(logx[-1] - logx[i])
    why = (
        f"failed: degenerate ESD ({what} equal to within rounding: "
        f"ln(max/xmin) = {spread:.2g} <= {tol[0] * math.sqrt(N - i) + tol[1]:.2g})"
    )
    return PowerLawFit(math.nan, float(x[i]), float(x[-1]), math.nan, math.nan, N - i, N, fit, why)


def _result(x: Tensor, i: int, alpha: float, D: float, N: int, fit: str, status: str) -> PowerLawFit:
    n_tail = N - i
    sigma = (alpha - 1.0) / math.sqrt(n_tail)
    return PowerLawFit(alpha, float(x[i]), float(x[-1]), D, sigma, n_tail, N, fit, status)


def _fit_small_n(x: Tensor, logx: Tensor, fit: str, tol: tuple[float, float]) -> PowerLawFit:
    """WeightWatcher 0.7.7's effective rule for fewer than :data:`SMALL_N_CUTOFF` eigenvalues.

    Candidates: tails of at least :data:`SMALL_N_MIN_TAIL` eigenvalues with
    ``s = sum ln(x / xmin) > 1e-12`` (WeightWatcher's guard) that are not equal to within rounding
    (htmuon's, see the module docstring); ``alpha = 1 + (n - 1) / s`` (the bias-corrected MLE); the
    candidate with the smallest KS distance ``D`` wins. (WeightWatcher's small-sample code ranks
    candidates by ``D - 0.868 / sqrt(n)``, but its constructor then re-selects by the smallest
    ``D``, which is what its reported alpha comes from; that is reproduced here.) If no candidate
    qualifies, the whole ESD is the tail; if it is degenerate too, the fit fails.
    """
    N = x.numel()
    idx = torch.arange(max(0, N - SMALL_N_MIN_TAIL + 1), device=x.device)
    if idx.numel():
        n, s, alpha = _candidates(x, logx, idx, bias=1.0)
        ok = (s > SMALL_N_DEGENERATE) & (alpha > 1.0) & _distinct(logx, idx, tol)
        if bool(ok.any()):
            D = torch.where(ok, _ks_distances(x, logx, idx, alpha, n), torch.ones_like(alpha))
            k = int(torch.argmin(D))
            return _result(x, int(idx[k]), float(alpha[k]), float(D[k]), N, fit, "ok")
    # no admissible tail: fit the whole ESD
    zero = torch.zeros(1, dtype=torch.long, device=x.device)
    n, s, alpha = _candidates(x, logx, zero, bias=1.0)
    if float(s[0]) <= SMALL_N_DEGENERATE or not bool(_distinct(logx, zero, tol)[0]):
        return _failed(x, logx, 0, fit, tol, "its eigenvalues are")
    D = _ks_distances(x, logx, zero, alpha, n)
    return _result(x, 0, float(alpha[0]), float(D[0]), N, fit, "ok")
