"""Heavy-tailed self-regularisation (HT-SR) diagnostics: layer-wise ESDs and power-law alpha.

>>> import torch
>>> from htmuon.diagnostics import analyze
>>> report = analyze(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 64)))
>>> report.fit, len(report.rows)
('ks', 2)

* :func:`analyze` -- per-layer table (alpha, xmin, D, alpha_weighted, log_norm, stable_rank, ...)
  of a model, state_dict, checkpoint or tensor, WeightWatcher-compatible by default (``fit="ks"``).
* :func:`open_checkpoint` -- a checkpoint file or folder (Hugging Face, DCP, Lightning, torch.save),
  read layer batch by layer batch by :func:`analyze`; :func:`alpha_table` -- runs side by side.
* :class:`AlphaTracker` -- logs per-layer and mean alpha every N training steps.
* :func:`fit_powerlaw` -- the power-law fit of one ESD (``"ks"``, ``"median"``, ``"fix-finger"``).
* :mod:`htmuon.diagnostics.plots` -- PNG plots (needs matplotlib: ``pip install htmuon[plot]``).
"""

from .esd import COLUMNS, KINDS, METHODS, ESDReport, alpha_table, analyze, layer_eigenvalues
from .powerlaw import EVALS_THRESH, FITS, PowerLawFit, fit_powerlaw
from .readers import Checkpoint, open_checkpoint
from .tracker import AlphaTracker

__all__ = [
    "COLUMNS",
    "EVALS_THRESH",
    "FITS",
    "KINDS",
    "METHODS",
    "AlphaTracker",
    "Checkpoint",
    "ESDReport",
    "PowerLawFit",
    "alpha_table",
    "analyze",
    "fit_powerlaw",
    "layer_eigenvalues",
    "open_checkpoint",
]
