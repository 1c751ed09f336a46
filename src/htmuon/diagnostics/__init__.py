"""Heavy-tailed self-regularisation (HT-SR) diagnostics: layer-wise ESDs and power-law alpha.

>>> import torch
>>> from htmuon.diagnostics import analyze
>>> report = analyze(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 64)))
>>> report.fit, len(report.rows)
('ks', 2)

* :func:`analyze` -- per-layer table (alpha, xmin, D, alpha_weighted, log_norm, stable_rank, ...)
  of a model, state_dict, checkpoint or tensor, WeightWatcher-compatible by default (``fit="ks"``).
* :class:`AlphaTracker` -- logs per-layer and mean alpha every N training steps.
* :func:`fit_powerlaw` -- the power-law fit of one ESD (``"ks"``, ``"median"``, ``"fix-finger"``).
* :mod:`htmuon.diagnostics.plots` -- PNG plots (needs matplotlib: ``pip install htmuon[plot]``).
"""

from .esd import COLUMNS, KINDS, METHODS, ESDReport, analyze, layer_eigenvalues
from .powerlaw import EVALS_THRESH, FITS, PowerLawFit, fit_powerlaw
from .tracker import AlphaTracker

__all__ = [
    "COLUMNS",
    "EVALS_THRESH",
    "FITS",
    "KINDS",
    "METHODS",
    "AlphaTracker",
    "ESDReport",
    "PowerLawFit",
    "analyze",
    "fit_powerlaw",
    "layer_eigenvalues",
]
