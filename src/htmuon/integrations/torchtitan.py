"""HTMuon in torchtitan (the PyTorch-native LLM training platform); written against torchtitan 0.3.0.

torchtitan builds its optimizers from ``OptimizersContainer.Config``: a list of ``ParamGroupConfig``
(regex on parameter names -> optimizer name + kwargs), the optimizer name resolved by
``OptimizersContainer._resolve_optimizer_factory``. This module adds the name ``"HTMuon"``:

* :class:`HTMuonOptimizersContainer` -- the container with ``"HTMuon"`` registered (and torchtitan's
  own ``"Adam"``, ``"AdamW"``, ... still available); its ``Config`` builds it.
* :func:`htmuon_optimizer_config` -- a ready config: hidden matrices -> HTMuon, embeddings / output
  head / norms / biases -> HTMuon's AdamW part (``algorithm="adamw"``), all in one HTMuon object;
  a non-matrix that no pattern names (gpt-oss's attention ``sinks``, a depthwise conv kernel) goes
  to the AdamW part too, by HTMuon's own routing.
* :func:`build_htmuon` -- the factory (drops torchtitan's ``fused`` / ``foreach`` flags).

In a torchtitan config registry function::

    from htmuon.integrations.torchtitan import htmuon_optimizer_config
    config.optimizer = htmuon_optimizer_config(lr=0.02, adamw_lr=1e-3, p=0.125, weight_decay=0.1)

Under torchtitan's FSDP2 / HSDP the parameters are DTensors and HTMuon divides its spectral work among
the ranks (see :mod:`htmuon.distributed`); tensor parallelism (a second sharded mesh dimension) is
refused with a clear error. Checkpoints go through torchtitan's usual
flat, FQN-keyed optimizer state (HTMuon's state is DTensors and plain numbers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..optim import HTMuon

try:
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
except ImportError as e:  # depends on the environment
    # torchtitan absent, or present with one of its own imports failing (tyro, spmd_types, a PyTorch
    # too old for it): the message says which, instead of "install torchtitan" to one who has it
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "torchtitan":
        why = "it is not installed (pip install torchtitan; it expects a recent PyTorch, see its README)"
    else:
        why = f"importing torchtitan.components.optimizer failed: {type(e).__name__}: {e}"
    raise ImportError(f"htmuon.integrations.torchtitan needs torchtitan: {why}") from e

__all__ = ["HTMuonOptimizersContainer", "build_htmuon", "htmuon_optimizer_config"]

#: Per-group keys torchtitan adds for its own optimizers; meaningless to HTMuon.
TORCHTITAN_IMPL_KEYS = ("fused", "foreach")
#: Parameter-name patterns sent to HTMuon's AdamW part by :func:`htmuon_optimizer_config` (the
#: "standard" routing). torchtitan 0.3.0's names: ``tok_embeddings``, ``lm_head`` (``output`` before),
#: ``*norm*``, biases, and its MoE experts' stacked biases ``mlp1_bias_EG`` / ``mlp2_bias_ED`` (a
#: shape suffix after ``bias``).
ADAMW_PATTERNS = (r"embed", r"(^|\.)(output|lm_head)\.", r"norm", r"bias(_[A-Z]+)?$")


def build_htmuon(param_groups: list[dict[str, Any]], **kwargs: Any) -> HTMuon:
    """torchtitan optimizer factory: ``HTMuon(param_groups, **kwargs)`` without torchtitan's impl flags."""
    groups = [{k: v for k, v in g.items() if k not in TORCHTITAN_IMPL_KEYS} for g in param_groups]
    return HTMuon(groups, **kwargs)


class HTMuonOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` with the optimizer name ``"HTMuon"`` registered."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Any:
        if name == "HTMuon":
            return build_htmuon
        return OptimizersContainer._resolve_optimizer_factory(name)


def htmuon_optimizer_config(
    lr: float = 0.02,
    adamw_lr: float = 1e-3,
    p: float = 0.125,
    weight_decay: float = 0.1,
    adamw_weight_decay: float | None = None,
    adamw_patterns: tuple[str, ...] = ADAMW_PATTERNS,
    process_group: Any = None,
    **htmuon_options: Any,
) -> HTMuonOptimizersContainer.Config:
    """An optimizer config for torchtitan: one HTMuon object, its AdamW and HTMuon parts.

    Parameters whose name matches one of ``adamw_patterns`` (regexes, searched in the name; a
    single string is one pattern) go to the AdamW part (``adamw_lr``, ``adamw_weight_decay``).
    Every other parameter is routed by HTMuon's own rule (``algorithm="auto"``, by name and shape,
    as ``HTMuon(model.named_parameters())``): the matrices to HTMuon (``lr``, ``p``,
    ``weight_decay``); a vector (gpt-oss's attention ``sinks``, Qwen3.5's ``A_log``), a matrix with
    a side of 1 (a depthwise conv kernel) or an output head that no pattern names to a third group,
    AdamW with ``adamw_lr`` and ``adamw_weight_decay``.
    ``adamw_patterns=()``: no pattern group, HTMuon's rule alone decides (before, an empty pattern
    matched every name).
    ``htmuon_options`` (``method``, ``interval``, ``plugin``, ``adamw_betas``, ``adamw_eps``,
    ``check_finite``, ...) go to both groups, as ``HTMuon(..., **options)`` gives them to every group:
    each part reads its own. ``process_group``: see :class:`htmuon.HTMuon` (DDP-style replicated
    parameters only; FSDP2 needs none).

    Raises:
        ValueError: a pattern that is no regex, or ``algorithm`` among the options (the
            patterns decide it) -- here, not after torchtitan has built the model.
    """
    if isinstance(adamw_patterns, str):  # one pattern, not one pattern per character
        adamw_patterns = (adamw_patterns,)
    adamw_patterns = tuple(adamw_patterns)
    for pat in adamw_patterns:
        try:
            re.compile(pat)
        except (re.error, TypeError) as e:
            raise ValueError(f"adamw_patterns: {pat!r} is not a regex ({e})") from None
    if "algorithm" in htmuon_options:
        raise ValueError(
            "algorithm is not an option of htmuon_optimizer_config: adamw_patterns decide which "
            "parameters go to the AdamW part"
        )
    wd = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    groups = [
        ParamGroupConfig(
            pattern="|".join(f"(?:{pat})" for pat in adamw_patterns),
            optimizer_name="HTMuon",
            # every option to both groups (each part reads its own: adamw_betas, check_finite, ...)
            optimizer_kwargs=htmuon_options | {"algorithm": "adamw", "lr": adamw_lr, "weight_decay": wd},
        ),
        ParamGroupConfig(
            pattern=r".*",
            optimizer_name="HTMuon",
            # "auto": the matrices to HTMuon; a non-matrix no pattern names to the AdamW part, with
            # its lr and weight decay (before, "htmuon": gpt-oss's sinks stopped the build)
            optimizer_kwargs={
                "algorithm": "auto",
                "lr": lr,
                "p": p,
                "weight_decay": weight_decay,
                "adamw_lr": adamw_lr,
                "adamw_weight_decay": wd,
            }
            | htmuon_options,
        ),
    ][0 if adamw_patterns else 1 :]
    factory_kwargs = {} if process_group is None else {"HTMuon": {"process_group": process_group}}
    return HTMuonOptimizersContainer.Config(
        param_groups=groups, implementation="for-loop", optimizer_factory_kwargs_by_name=factory_kwargs
    )
