"""Deprecated alias of :mod:`htmuon.torchrun` (the torchrun helpers' old name), kept for one release.

``from htmuon import parallel`` still works and warns; import :mod:`htmuon.torchrun` instead. The
distributed optimizer step itself lives in :mod:`htmuon.distributed`.
"""

from __future__ import annotations

import warnings

from htmuon.torchrun import *  # noqa: F403
from htmuon.torchrun import __all__ as __all__

warnings.warn(
    "htmuon.parallel was renamed htmuon.torchrun; the old name goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
