"""Routing a model's parameters between the HTMuon part and the AdamW part of :class:`HTMuon`."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["ROUTINGS", "param_groups", "classify_parameters"]

#: "standard": hidden matrices -> HTMuon; embeddings, output head, norms, biases -> AdamW (what most
#: Muon libraries do). "paper": the paper's LLaMA runs: embeddings and the LM head go to HTMuon too.
ROUTINGS = ("standard", "paper")
#: Last name components that mark an output head / classifier.
DEFAULT_HEAD_NAMES = ("lm_head", "head", "classifier", "output", "fc")

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def classify_parameters(
    model: nn.Module, head_names: tuple[str, ...] = DEFAULT_HEAD_NAMES
) -> list[tuple[str, nn.Parameter, str]]:
    """``(name, parameter, kind)`` for every trainable parameter, each once (tied weights included).

    ``kind`` is ``"embedding"`` (a weight of an ``nn.Embedding``), ``"head"`` (a matrix of a module
    whose last name component is in ``head_names``), ``"matrix"`` (any other parameter with
    ``ndim >= 2``) or ``"vector"`` (norm gains, biases, scalars).
    """
    seen: set[int] = set()
    out: list[tuple[str, nn.Parameter, str]] = []
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{pname}" if module_name else pname
            if param.ndim < 2:
                kind = "vector"
            elif isinstance(module, _EMBEDDINGS):
                kind = "embedding"
            elif module_name.rsplit(".", 1)[-1] in head_names:
                kind = "head"
            else:
                kind = "matrix"
            out.append((full, param, kind))
    return out


def param_groups(
    model: nn.Module,
    routing: str = "standard",
    *,
    lr: float | None = None,
    adamw_lr: float | None = None,
    weight_decay: float | None = None,
    adamw_weight_decay: float | None = None,
    head_names: tuple[str, ...] = DEFAULT_HEAD_NAMES,
    **htmuon_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`htmuon.HTMuon`: an ``algorithm="htmuon"`` and an ``algorithm="adamw"`` group.

    Args:
        model: the model.
        routing: ``"standard"`` (hidden matrices -> HTMuon; embeddings, head, norms, biases -> AdamW)
            or ``"paper"`` (embeddings and head -> HTMuon too, as in the paper's LLaMA runs).
        lr, weight_decay: for the HTMuon group (``None``: the optimizer's defaults).
        adamw_lr, adamw_weight_decay: for the AdamW group (``None``: the optimizer's defaults).
        head_names: last name components marking an output head.
        **htmuon_options: further per-group options for the HTMuon group (``p``, ``method``, ...).

    Returns:
        A list of group dicts (empty groups left out), each with ``names`` (the parameters' names,
        used in error messages; not torch's ``param_names``, so groups added later need no names).

    Example:
        >>> opt = HTMuon(param_groups(model, adamw_lr=1e-3), lr=0.02)
    """
    if routing not in ROUTINGS:
        raise ValueError(f"Invalid routing: {routing!r}; valid: {ROUTINGS}")
    to_htmuon = {"matrix"} if routing == "standard" else {"matrix", "embedding", "head"}
    hgroup: dict[str, Any] = {"params": [], "names": [], "algorithm": "htmuon", **htmuon_options}
    agroup: dict[str, Any] = {"params": [], "names": [], "algorithm": "adamw"}
    for name, param, kind in classify_parameters(model, head_names):
        group = hgroup if kind in to_htmuon else agroup
        group["params"].append(param)
        group["names"].append(name)
    for group, group_lr, group_wd in ((hgroup, lr, weight_decay), (agroup, adamw_lr, adamw_weight_decay)):
        if group_lr is not None:
            group["lr"] = group_lr
        if group_wd is not None:
            group["weight_decay"] = group_wd
    groups = [g for g in (hgroup, agroup) if g["params"]]
    if not groups:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    return groups
