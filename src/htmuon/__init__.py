"""htmuon: the HTMuon optimizer (Muon with a heavy-tailed spectral correction), diagnostics and harness.

>>> import torch, htmuon
>>> model = torch.nn.Linear(32, 16)
>>> opt = htmuon.HTMuon(htmuon.param_groups(model, adamw_lr=1e-3), lr=0.02, p=0.125)
"""

from . import fast as fast  # registers the "fast" and "fast5" spectral backends
from . import functional as functional
from .optim import HTMuon, NonFiniteGradientError
from .routing import ROUTINGS, param_groups
from .spectral import BACKENDS, MUON_NS5_COEFFICIENTS, polar, register_backend, spectral_power

__version__ = "0.2.0"

__all__ = [
    "BACKENDS",
    "MUON_NS5_COEFFICIENTS",
    "ROUTINGS",
    "HTMuon",
    "NonFiniteGradientError",
    "__version__",
    "param_groups",
    "polar",
    "register_backend",
    "spectral_power",
]
