"""Track layer-wise power-law alpha during training."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .esd import ESDReport, _checked_options, _resolve_dtype, _resolve_method, analyze
from .powerlaw import _check_fit

__all__ = ["AlphaTracker"]


class AlphaTracker:
    """Compute per-layer alpha and the mean alpha every ``every`` steps.

    Call it once per step; on steps that are a multiple of ``every`` (step 0 included) it runs
    :func:`~htmuon.diagnostics.analyze` on the model, where the model lives (batched by shape,
    float64 on CPU, float32 on accelerators, no gradients), appends a record to :attr:`history`
    and returns it; on other steps it returns None at no cost.

    Args:
        every: analyse every ``every``-th step (an int >= 1).
        fit: xmin rule, one of ``"ks"``, ``"median"``, ``"fix-finger"``.
        callback: called with each record (e.g. a logger's ``log`` function).
        **analyze_kwargs: passed to :func:`~htmuon.diagnostics.analyze` (``layers=``, ``dtype=``, ...).

    A model sharded by FSDP2 (``fully_shard``) or tensor parallelism holds DTensor weights, which
    :func:`~htmuon.diagnostics.analyze` does not gather (a collective): it raises, saying how to
    gather a full state dict to analyse on rank 0 instead.

    Attributes:
        history: the records so far, oldest first.
        last_report: the full :class:`~htmuon.diagnostics.ESDReport` of the latest record.

    Example:
        >>> tracker = AlphaTracker(every=100)
        >>> for step in range(...):                    # doctest: +SKIP
        ...     train_step()
        ...     if (rec := tracker(model, step)) is not None:
        ...         print(step, rec["mean_alpha"])
    """

    def __init__(
        self,
        every: int = 100,
        fit: str = "ks",
        *,
        callback: Callable[[dict[str, Any]], Any] | None = None,
        **analyze_kwargs: Any,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every!r}; expected an int >= 1")
        self.every = every
        self.fit = _check_fit(fit)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        _check_analyze_kwargs(self.fit, analyze_kwargs)
        self.callback = callback
        self.analyze_kwargs = analyze_kwargs
        self.history: list[dict[str, Any]] = []
        self.last_report: ESDReport | None = None

    def __call__(self, model: nn.Module, step: int) -> dict[str, Any] | None:
        """Record ``{"step", "mean_alpha", "alphas": {name: alpha}}`` if ``step % every == 0``."""
        if step % self.every:
            return None
        report = analyze(model, fit=self.fit, **self.analyze_kwargs)
        self.last_report = report
        rec = {"step": int(step), "mean_alpha": report.mean_alpha, "alphas": report.alphas}
        self.history.append(rec)
        if self.callback is not None:
            self.callback(rec)
        return rec

    def mean_alphas(self) -> list[tuple[int, float]]:
        """``[(step, mean_alpha), ...]`` over the history."""
        return [(r["step"], r["mean_alpha"]) for r in self.history]


def _check_analyze_kwargs(fit: str, kwargs: dict[str, Any]) -> None:
    """Refuse, when the tracker is made, options that :func:`analyze` would refuse at its first call
    (which may be hours into training): an unknown keyword, then analyze's own checks, and the dtype
    and method as they resolve on the device asked for (the CPU if none)."""
    try:
        bound = inspect.signature(analyze).bind(None, fit, **kwargs)
    except TypeError as e:
        raise TypeError(f"AlphaTracker: {e} (extra keywords go to analyze())") from None
    bound.apply_defaults()
    a = bound.arguments
    _, dev = _checked_options(
        a["fit"], a["conv1d"], a["min_evals"], a["max_evals"], a["max_N"], a["layers"], a["device"]
    )
    _resolve_method(a["method"], _resolve_dtype(dev or torch.device("cpu"), a["dtype"]))
