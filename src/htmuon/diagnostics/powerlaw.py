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
    bias correction, and the winner minimises ``D - 0.868 / sqrt(n)`` instead of ``D``.
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
    mistake (so in effect only the upper bound acts); here both bounds act, in linear space.

All three ignore eigenvalues ``<= thresh`` (WeightWatcher's ``EVALS_THRESH = 1e-5``) and compute
in float64 on the eigenvalues' device (float32 where the device has no float64). The KS search is
vectorised over candidates (in row chunks, so memory stays bounded for large ESDs).

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
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EVALS_THRESH",
    "FITS",
    "SMALL_N_CUTOFF",
    "SMALL_N_MIN_TAIL",
    "PowerLawFit",
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


def fit_powerlaw(evals: Tensor, fit: str = "ks", *, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Fit ``p(lambda) ~ lambda^-alpha`` to the tail of an ESD, choosing ``xmin`` by ``fit``.

    Args:
        evals: 1-D tensor of eigenvalues of ``W^T W`` (any order, any device).
        fit: the xmin rule, one of :data:`FITS` (see the module docstring).
        thresh: eigenvalues ``<= thresh`` are ignored.

    Returns:
        A :class:`PowerLawFit`. A fit that cannot be made (fewer than two eigenvalues above
        ``thresh``) is returned with ``alpha = nan`` and ``status = "failed: ..."``; it does not raise.

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
    x = evals.to(_fit_dtype(evals.device))
    x = torch.sort(x[x > thresh]).values
    N = x.numel()
    xmax = float(x[-1]) if N else float("nan")
    if N < 2:
        why = f"failed: {N} eigenvalue(s) above {thresh:g}, need at least 2"
        return PowerLawFit(math.nan, math.nan, xmax, math.nan, math.nan, 0, N, fit, why)
    logx = torch.log(x)
    status = "ok"

    if fit == "median":
        i = N // 2
        idx = torch.tensor([i], device=x.device)
        n, _, alpha = _candidates(x, logx, idx, bias=0.0)
        D = _ks_distances(x, logx, idx, alpha, n)
        return _result(x, i, float(alpha[0]), float(D[0]), N, fit, status)

    if fit == "ks" and N < SMALL_N_CUTOFF:
        return _fit_small_n(x, logx, fit)

    idx = torch.arange(N - 1, device=x.device)
    if fit == "fix-finger":
        lo, hi = _finger_window(x)
        keep = (x[:-1] >= lo) & (x[:-1] <= hi)
        if bool(keep.any()):
            idx = idx[keep]
        else:
            status = "ok (fix-finger window empty: used every xmin)"
    n, _, alpha = _candidates(x, logx, idx, bias=0.0)
    D = _ks_distances(x, logx, idx, alpha, n)
    # a tail of equal eigenvalues has sum ln(x / xmin) = 0: alpha = inf and a NaN distance, which
    # argmin would pick over every real candidate; such tails are not power laws
    valid = (alpha > 1.0) & torch.isfinite(alpha) & torch.isfinite(D)
    if not bool(valid.any()):
        why = "failed: degenerate ESD (no tail of distinct eigenvalues to fit)"
        return PowerLawFit(math.nan, float(x[0]), xmax, math.nan, math.nan, N, N, fit, why)
    D = torch.where(valid, D, torch.ones_like(D))
    k = int(torch.argmin(D))
    return _result(x, int(idx[k]), float(alpha[k]), float(D[k]), N, fit, status)


def _result(x: Tensor, i: int, alpha: float, D: float, N: int, fit: str, status: str) -> PowerLawFit:
    n_tail = N - i
    sigma = (alpha - 1.0) / math.sqrt(n_tail)
    return PowerLawFit(alpha, float(x[i]), float(x[-1]), D, sigma, n_tail, N, fit, status)


def _fit_small_n(x: Tensor, logx: Tensor, fit: str) -> PowerLawFit:
    """WeightWatcher 0.7.7's effective rule for fewer than :data:`SMALL_N_CUTOFF` eigenvalues.

    Candidates: tails of at least :data:`SMALL_N_MIN_TAIL` eigenvalues with
    ``s = sum ln(x / xmin) > 1e-12``; ``alpha = 1 + (n - 1) / s`` (the bias-corrected MLE); the
    candidate with the smallest KS distance ``D`` wins. (WeightWatcher's small-sample code ranks
    candidates by ``D - 0.868 / sqrt(n)``, but its constructor then re-selects by the smallest
    ``D``, which is what its reported alpha comes from; that is reproduced here.) If no candidate
    qualifies, the whole ESD is the tail.
    """
    N = x.numel()
    idx = torch.arange(max(0, N - SMALL_N_MIN_TAIL + 1), device=x.device)
    if idx.numel():
        n, s, alpha = _candidates(x, logx, idx, bias=1.0)
        ok = (s > SMALL_N_DEGENERATE) & (alpha > 1.0)
        if bool(ok.any()):
            D = torch.where(ok, _ks_distances(x, logx, idx, alpha, n), torch.ones_like(alpha))
            k = int(torch.argmin(D))
            return _result(x, int(idx[k]), float(alpha[k]), float(D[k]), N, fit, "ok")
    # no admissible tail: fit the whole ESD
    zero = torch.zeros(1, dtype=torch.long, device=x.device)
    n, s, alpha = _candidates(x, logx, zero, bias=1.0)
    if float(s[0]) <= SMALL_N_DEGENERATE:
        why = "failed: degenerate ESD (all eigenvalues above the threshold are equal)"
        return PowerLawFit(math.nan, float(x[0]), float(x[-1]), math.nan, math.nan, N, N, fit, why)
    D = _ks_distances(x, logx, zero, alpha, n)
    return _result(x, 0, float(alpha[0]), float(D[0]), N, fit, "ok")
