"""Plots of heavy-tail diagnostics (matplotlib's object API; no pyplot state is touched).

* :func:`plot_layer_alpha` -- layer-wise alpha, one series per optimizer/run (the paper's Fig. 6 kind).
* :func:`plot_esd` -- a log-log ESD histogram with the fitted power law and ``xmin``.
* :func:`plot_update_spectra` -- singular values of update matrices by rank (the paper's Fig. 1b/c kind).

Each function saves a figure to ``path`` (creating its folder) in the format its suffix names (``.png``,
``.pdf``, ``.svg``, ... : :func:`plot_format`; PNG without a suffix), returns the path, and keeps no
figure alive. matplotlib is imported only when a function is called (``pip install htmuon[plot]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .esd import ESDReport, layer_eigenvalues
from .powerlaw import EVALS_THRESH, fit_powerlaw

__all__ = ["plot_esd", "plot_format", "plot_layer_alpha", "plot_update_spectra"]

_DPI = 120


def _new_figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("htmuon.diagnostics.plots needs matplotlib: pip install htmuon[plot]") from e
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _log_axes(ax) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # avoid overlapping 2x10^-1, 3x10^-1, ... labels
    ax.grid(alpha=0.3, which="both")


def plot_format(path: str | os.PathLike) -> str:
    """The format a plot saved to ``path`` is written in: its suffix's (``png``, ``pdf``, ``svg``, ...),
    ``png`` without one.

    Raises:
        ValueError: a suffix matplotlib cannot write (before, every plot was a PNG whatever the name:
            ``alpha.pdf`` held PNG bytes).
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if not suffix:
        return "png"
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("htmuon.diagnostics.plots needs matplotlib: pip install htmuon[plot]") from e
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(
            f"cannot write a plot as .{suffix} ({os.fspath(path)!r}): give a path ending in one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    return suffix


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    fmt = plot_format(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, format=fmt)
    fig.clear()
    return path


def _as_1d(values: Any, what: str) -> Tensor:
    t = values if isinstance(values, Tensor) else torch.as_tensor(values)
    t = t.detach().to("cpu", torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError(f"{what} is empty")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf")
    return t


def plot_layer_alpha(
    reports: Mapping[str, ESDReport],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> str:
    """Layer-wise power-law alpha, one line per report (e.g. per optimizer), side by side.

    Layers are placed in the order of the first report (layers only in later reports follow), and
    every series is drawn in that order; a dashed line marks each report's mean alpha, given in the
    legend.

    Args:
        reports: ``{label: ESDReport}``, e.g. ``{"Muon": analyze(m1), "HTMuon": analyze(m2)}``.
        path: PNG file to write.
        title: figure title; default names the fit(s) used.

    Returns:
        ``path``.
    """
    if not isinstance(reports, Mapping) or not reports:
        raise ValueError("reports must be a non-empty dict {label: ESDReport}")
    for label, rep in reports.items():
        if not isinstance(rep, ESDReport):
            raise TypeError(f"reports[{label!r}] is a {type(rep).__name__}, not an ESDReport")
    names: list[str] = []
    seen: set[str] = set()
    for rep in reports.values():
        for r in rep.rows:
            if r["name"] not in seen:
                seen.add(r["name"])
                names.append(r["name"])
    pos = {n: i for i, n in enumerate(names)}
    fits = sorted({rep.fit for rep in reports.values()})

    fig = _new_figure(min(16.0, max(6.0, 0.22 * len(names) + 3.0)), 4.5)
    ax = fig.add_subplot()
    for k, (label, rep) in enumerate(reports.items()):
        color = f"C{k % 10}"
        # in the shared layer order, so a report that lists its layers in another order (safetensors
        # sorts names) is drawn left to right, not back and forth
        pts = sorted((pos[r["name"]], r["alpha"]) for r in rep.rows if math.isfinite(r["alpha"]))
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        ax.plot(
            xs, ys, marker="o", ms=3.5, lw=1.0, color=color, label=f"{label} (mean α = {rep.mean_alpha:.2f})"
        )
        if math.isfinite(rep.mean_alpha):
            ax.axhline(rep.mean_alpha, color=color, ls="--", lw=0.8, alpha=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("α (power-law exponent of the ESD)")
    if len(names) <= 48:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"Layer-wise α (fit: {', '.join(fits)}; lower = heavier tail)")
    return _save(fig, path)


def plot_esd(
    matrix_or_eigs: Any,
    path: str | os.PathLike,
    fit: str = "ks",
    *,
    bins: int = 100,
    thresh: float = EVALS_THRESH,
    title: str | None = None,
) -> str:
    """Log-log histogram of an ESD with the fitted power law and ``xmin``.

    Args:
        matrix_or_eigs: a weight (a tensor or array: 2-D, 3-D conv1d or 4-D conv2d; its eigenvalues are
            taken as in :func:`~htmuon.diagnostics.analyze`), or a 1-D array of eigenvalues ``lambda = s^2``.
        path: PNG file to write.
        fit: the xmin rule (``"ks"``, ``"median"``, ``"fix-finger"``).
        bins: number of log-spaced histogram bins.
        thresh: eigenvalues ``<= thresh`` are left out (as in the fit).
        title: figure title; default states alpha, D, xmin and the fit.

    Returns:
        ``path``.
    """
    shape: dict = {}  # a weight's own precision and size for the degenerate-tail rule (fit_powerlaw)
    if not isinstance(matrix_or_eigs, Tensor):  # a numpy matrix is a matrix, not eigenvalues
        matrix_or_eigs = torch.as_tensor(matrix_or_eigs)
    if matrix_or_eigs.ndim >= 2:
        evals = layer_eigenvalues(matrix_or_eigs)
        # (the larger side of each slice analyze takes: out x in for linear and conv weights alike)
        shape = dict(N=max(matrix_or_eigs.shape[:2]), weight_dtype=matrix_or_eigs.dtype)
    else:
        evals = matrix_or_eigs
    ev = _as_1d(evals, "eigenvalues")
    pl = fit_powerlaw(ev, fit, thresh=thresh, **shape)
    nz = ev[ev > thresh]
    if nz.numel() < 2:
        raise ValueError(f"need at least 2 eigenvalues above {thresh:g} to plot an ESD, got {nz.numel()}")
    lo, hi = math.log10(float(nz.min())), math.log10(float(nz.max()))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.logspace(lo, hi, bins + 1, dtype=torch.float64)
    counts = torch.histogram(nz, bins=edges).hist
    dens = counts / (nz.numel() * torch.diff(edges))

    fig = _new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    ax.stairs(
        dens.numpy(),
        edges.numpy(),
        fill=True,
        alpha=0.45,
        color="C0",
        label=f"ESD ({nz.numel()} eigenvalues)",
    )
    if math.isfinite(pl.alpha):
        x = torch.logspace(math.log10(pl.xmin), hi, 200, dtype=torch.float64)
        frac = pl.n_tail / nz.numel()  # the tail's share, so the line sits on the histogram's scale
        pdf = frac * (pl.alpha - 1.0) / pl.xmin * (x / pl.xmin) ** (-pl.alpha)
        ax.plot(x.numpy(), pdf.numpy(), color="C3", lw=1.8, label=f"power law, α = {pl.alpha:.3f}")
        ax.axvline(pl.xmin, color="C3", ls="--", lw=1.0, label=f"xmin = {pl.xmin:.4g}")
    _log_axes(ax)
    ax.set_xlabel("eigenvalue λ of WᵀW")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if title is None:
        title = (
            f"ESD, fit '{fit}': α = {pl.alpha:.3f}, D = {pl.D:.3f}, tail {pl.n_tail} of {nz.numel()}"
            if math.isfinite(pl.alpha)
            else f"ESD, fit '{fit}' {pl.status}"
        )
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_update_spectra(
    spectra: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    normalize: bool = False,
    title: str | None = None,
) -> str:
    """Singular values of update matrices against their rank, one line per label (log-log).

    Muon's update is (nearly) flat -- all singular values equal -- while HTMuon's ``s^p`` keeps a
    decaying, heavy-tailed profile; plotting the updates of both at chosen steps shows it.

    Args:
        spectra: ``{label: singular values}`` (1-D, any order) or ``{label: update matrix}``
            (2-D, a tensor or array; its singular values are computed), e.g. ``{"Muon, step 100": U1}``.
        path: PNG file to write.
        normalize: divide each spectrum by its largest value.
        title: figure title.

    Returns:
        ``path``.
    """
    if not isinstance(spectra, Mapping) or not spectra:
        raise ValueError("spectra must be a non-empty dict {label: singular values or matrix}")
    fig = _new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    for k, (label, v) in enumerate(spectra.items()):
        v = v if isinstance(v, Tensor) else torch.as_tensor(v)  # a numpy matrix is a matrix too
        if v.ndim == 2:
            v = torch.linalg.svdvals(v.detach().to("cpu", torch.float64))
        elif v.ndim > 2:
            raise ValueError(
                f"spectra[{label!r}] has shape {tuple(v.shape)}; expected singular values or a matrix"
            )
        s = torch.sort(_as_1d(v, f"spectra[{label!r}]"), descending=True).values
        if normalize and float(s[0]) > 0:
            s = s / s[0]
        s = s.clamp_min(torch.finfo(torch.float64).tiny)
        ax.plot(range(1, s.numel() + 1), s.numpy(), lw=1.4, color=f"C{k % 10}", label=str(label))
    _log_axes(ax)
    ax.set_xlabel("rank i")
    ax.set_ylabel("singular value s_i" + (" / s_1" if normalize else ""))
    ax.legend(fontsize=8)
    ax.set_title(title or "Singular values of the update matrix", fontsize=10)
    return _save(fig, path)
