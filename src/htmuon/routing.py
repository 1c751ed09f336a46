"""Routing a model's parameters between the HTMuon part and the AdamW part of :class:`HTMuon`.

Two entry points share one rule:

* :func:`param_groups` (a model): hidden matrices -> HTMuon; embeddings, the output head, norms and
  biases -> AdamW, judged from module types *and* names. Knowing the types, it also flattens
  ``nn.Conv1d`` / ``nn.ConvTranspose1d`` kernels (``batch_3d=False``) where ``batch_3d=True`` would
  take them for stacks of matrices.
* :func:`route_params` (what was passed to ``HTMuon(params, ...)``): every ``algorithm="auto"`` group
  is split into an ``"htmuon"`` and an ``"adamw"`` group. With names (``model.named_parameters()``,
  torch's ``param_names``) the split is by name (:func:`kind_from_name`) and equals
  :func:`param_groups` on the usual models; with bare tensors only the shape is known, so it is by
  shape (matrices -> HTMuon, the rest -> AdamW).

A non-empty tensor with ``ndim >= 2`` whose matrices (as :func:`htmuon.functional.matrix_shape`
views them with the group's ``batch_3d``) have a side of 1 (weight_norm's magnitude ``(out, 1)``
or ``(out, 1, 1, 1)``, a ``(1, d)`` weight, a ``(1, c, k, k)`` kernel) is a vector in disguise: its
spectral update would be its normalised gradient, a step of about ``lr`` whatever the gradient's
size. Both entry points route it as a ``"vector"`` (to AdamW), whatever its name; an explicit
``algorithm="htmuon"`` / ``use_muon=True`` group still gets the spectral update.

Names decide embeddings and heads as follows (``name`` = ``"owner.module.leaf"``): an
**embedding** is a matrix whose owning module's name, or its own leaf name when it is not
``weight``, contains ``embed``, is one of :data:`EMBEDDING_NAMES` (``wte``, ``wpe``, ``shared``),
or is ``emb``, starts with ``emb_`` or ends with ``_emb`` (:data:`EMBEDDING_ABBREVIATION`: minGPT's
``tok_emb`` / ``pos_emb``; a whole component, so ``member`` is none), or whose leaf name ends in
``token`` / ``tokens`` (a ViT's ``cls_token``);
a **head** is a matrix whose owning module's name is in :data:`DEFAULT_HEAD_NAMES`. Names cannot
tell an ``nn.Embedding`` called ``0`` in an ``nn.Sequential`` from a linear layer: pass the model to
:func:`param_groups` for such models.

A parametrized tensor (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``,
``orthogonal``) ``T`` of a module ``A`` is stored as ``A.parametrizations.T.original`` (or
``original0``, ``original1``, ...) in a ``ParametrizationList``: both entry points read it as
``A.T``, the tensor ``T`` of module ``A`` (:data:`PARAMETRIZATIONS`).
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

from .functional import matrix_shape
from .spectral import MUON_NS5_COEFFICIENTS

__all__ = [
    "DEFAULT_HEAD_NAMES",
    "EMBEDDING_ABBREVIATION",
    "EMBEDDING_NAMES",
    "ROUTINGS",
    "classify_parameters",
    "kind_from_name",
    "param_groups",
    "route_params",
]

#: "standard": hidden matrices -> HTMuon; embeddings, output head, norms, biases -> AdamW (what most
#: Muon libraries do). "paper": the paper's LLaMA runs: embeddings and the LM head go to HTMuon too.
ROUTINGS = ("standard", "paper")
#: Last name components that mark an output head / classifier (Hugging Face ``lm_head``, timm
#: ``head``, ``classifier``, torchtitan ``output``, torchvision ``fc``).
DEFAULT_HEAD_NAMES = ("lm_head", "head", "classifier", "output", "fc")
#: Module names of embeddings that do not contain "embed" (GPT-2's token and position tables, T5's
#: shared table); any name containing "embed" counts too (embed_tokens, word_embeddings, pos_embed,
#: GPT-NeoX's embed_in and its head embed_out).
EMBEDDING_NAMES = ("wte", "wpe", "shared")
#: A module (or bare parameter) name that is this, starts with it and "_" or ends with "_" and it
#: names an embedding (minGPT's and lucidrains' tok_emb, pos_emb, token_emb, emb).
EMBEDDING_ABBREVIATION = "emb"
#: The components torch.nn.utils.parametrize adds to a parametrized tensor ``A.T``'s name:
#: ``A.parametrizations.T.original`` (one tensor) or ``.original0``, ``.original1``, ... (several,
#: as weight_norm's magnitude and direction).
PARAMETRIZATIONS = "parametrizations"
_ORIGINAL = re.compile(r"original\d*")
#: Endings of a bare parameter's own name that mark learned tokens (cls_token, mask_token,
#: register_tokens): lookup rows, not weight matrices.
LEARNED_TOKEN_SUFFIXES = ("token", "tokens")
#: Per-group keys of the routing itself (consumed before the groups reach torch).
ROUTING_KEYS = ("use_muon", "routing", "adamw_lr", "adamw_weight_decay")
#: Group keys of other optimizers' conventions, read as HTMuon's AdamW options (torch's AdamW,
#: MuonWithAuxAdam: betas, eps; pytorch-optimizer's Muon: adamw_wd).
ALIASES = {"betas": "adamw_betas", "eps": "adamw_eps", "adamw_wd": "adamw_weight_decay"}
_ADAMW_READS = ("adamw_betas", "adamw_eps", "check_finite")
#: Options an ``algorithm="adamw"`` group reads besides ``lr`` / ``weight_decay``, and their
#: :data:`ALIASES` (``betas``, ``eps``): :func:`param_groups` gives them to both groups.
ADAMW_PART_OPTIONS = _ADAMW_READS + tuple(alias for alias, key in ALIASES.items() if key in _ADAMW_READS)
#: torch.optim.Muon's ``adjust_lr_fn`` values, as HTMuon's ``lr_adjust`` (the same rules:
#: ``sqrt(max(1, m / n))`` and ``0.2 sqrt(max(m, n))``).
TORCH_MUON_LR_ADJUST = {None: "muon", "original": "muon", "match_rms_adamw": "adamw_rms"}
#: torch.optim.Muon's Newton--Schulz coefficients, which HTMuon's polar factor runs (``ns_coefficients``
#: in a group is accepted only as these: other ones would be silently ignored).
TORCH_MUON_NS_COEFFICIENTS = MUON_NS5_COEFFICIENTS
#: Group keys others put there (torch, LR schedulers, torchtitan, user labels): never typo candidates.
FOREIGN_KEYS = frozenset(
    {
        "name",
        "initial_lr",
        "max_lr",
        "min_lr",
        "base_lr",
        "max_momentum",
        "base_momentum",
        "lr_scale",
        "fused",
        "foreach",
        "capturable",
        "differentiable",
        "maximize",
        "amsgrad",
        "decoupled_weight_decay",
    }
)
#: torch.optim flags that would change the update if HTMuon honoured them: set to a true value they
#: are refused (False / None pass, as from a group copied from another optimizer).
UNSUPPORTED_FLAGS = {
    "maximize": "it minimizes: negate the loss",
    "differentiable": "its step is not differentiable",
    "amsgrad": "its AdamW part is plain AdamW, without AMSGrad's running maximum",
}
#: difflib similarity above which an unknown group key is taken for a misspelt option.
TYPO_CUTOFF = 0.8

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
#: Modules whose 3-D weight is a conv kernel (out, in, k), to flatten to out x in*k (``batch_3d=False``;
#: a ConvTranspose1d weight is (in, out / groups, k), flattened the same way: in x out/groups*k).
_CONV1D = (nn.Conv1d, nn.ConvTranspose1d)
_KINDS_TO_HTMUON = {"standard": frozenset({"matrix"}), "paper": frozenset({"matrix", "embedding", "head"})}


def _is_embedding_name(component: str) -> bool:
    low, abbr = component.lower(), EMBEDDING_ABBREVIATION
    return (
        "embed" in low
        or low in EMBEDDING_NAMES
        or low == abbr
        or low.startswith(f"{abbr}_")
        or low.endswith(f"_{abbr}")
    )


def _unparametrized(name: str) -> str:
    """``A.parametrizations.T.original[N]`` -> ``A.T`` (the name of the tensor it parametrizes); any
    other name unchanged."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == PARAMETRIZATIONS and _ORIGINAL.fullmatch(parts[-1]):
        return ".".join([*parts[:-3], parts[-2]])
    return name


def _is_numpy_bool(v: Any) -> bool:
    """A NumPy bool scalar (``np.bool_``; NumPy is not imported for it: torch runs without NumPy)."""
    return type(v).__module__ == "numpy" and type(v).__name__ in ("bool_", "bool")


def _is_false(v: Any) -> bool:
    """``False`` as a group setting gives it: Python's, or NumPy's (a config sweep's value, which
    :class:`htmuon.HTMuon` takes as ``False``; ``v is False`` missed it)."""
    return v is False or (_is_numpy_bool(v) and not v)


def _is_vector_in_disguise(shape: Sequence[int], batch_3d: bool = True) -> bool:
    """``ndim >= 2``, but the matrices the update works on (``matrix_shape``: a 4-D kernel flattened
    to ``out x in*kh*kw``, a 3-D tensor a batch of matrices with ``batch_3d``) have a side of 1: a
    ``(out, 1)`` magnitude, a ``(1, d)`` weight, a one-output ``Conv2d`` kernel ``(1, c, k, k)``,
    ``(E, 1, d)`` stacked rows. None 0: an empty matrix has no update at all and is left as routed."""
    if len(shape) < 2 or 0 in shape:
        return False
    _, m, n = matrix_shape(shape, batch_3d)
    return min(m, n) == 1


def _kind_from_shape(shape: Sequence[int], batch_3d: bool = True) -> str:
    """The routing kind of a bare tensor: ``"matrix"`` (``ndim >= 2``, unless a vector in disguise)
    or ``"vector"``."""
    return "matrix" if len(shape) >= 2 and not _is_vector_in_disguise(shape, batch_3d) else "vector"


def kind_from_name(
    name: str,
    ndim: int,
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    *,
    shape: Sequence[int] | None = None,
    batch_3d: bool = True,
) -> str:
    """The routing kind of a parameter known only by its dotted name and ``ndim`` (and ``shape``).

    Returns ``"vector"`` (``ndim < 2``: norm gains, biases; with ``shape``, also a tensor whose
    matrices, as ``batch_3d`` views them, have a side of 1, such as weight_norm's ``(out, 1)``
    magnitude),
    ``"embedding"``, ``"head"`` or ``"matrix"`` (any other parameter with ``ndim >= 2``); see the
    module docstring for the rule. A parametrized tensor's name (``A.parametrizations.T.original0``)
    is read as ``A.T``.

    Example:
        >>> kind_from_name("model.embed_tokens.weight", 2), kind_from_name("lm_head.weight", 2)
        ('embedding', 'head')
    """
    if ndim < 2 or (shape is not None and _is_vector_in_disguise(shape, batch_3d)):
        return "vector"
    owner, _, leaf = _unparametrized(name).rpartition(".")
    module = owner.rpartition(".")[2]
    if _is_embedding_name(module) or (leaf != "weight" and _is_embedding_name(leaf)):
        return "embedding"
    if leaf.lower().endswith(LEARNED_TOKEN_SUFFIXES):  # a ViT's cls_token, DINOv2's register_tokens
        return "embedding"
    if module in tuple(head_names):
        return "head"
    return "matrix"


def classify_parameters(
    model: nn.Module, head_names: tuple[str, ...] = DEFAULT_HEAD_NAMES
) -> list[tuple[str, nn.Parameter, str]]:
    """``(name, parameter, kind)`` for every trainable parameter, each once (tied weights included).

    ``kind`` is :func:`kind_from_name`'s, except that every weight of an ``nn.Embedding`` /
    ``nn.EmbeddingBag`` is an ``"embedding"`` whatever its name (a parametrized one's too: the
    module read is the one that owns the parametrization, not its ``ParametrizationList``).
    """
    return [(name, param, kind) for name, param, kind, _ in _classify(model, head_names)]


def _classify(
    model: nn.Module, head_names: Iterable[str], batch_3d: bool = True
) -> list[tuple[str, nn.Parameter, str, nn.Module]]:
    """:func:`classify_parameters`, each with the module that owns the parameter (for a parametrized
    tensor ``A.parametrizations.T.original[N]``: ``A``)."""
    seen: set[int] = set()
    out: list[tuple[str, nn.Parameter, str, nn.Module]] = []
    for module_name, module in model.named_modules():
        owner = module
        if isinstance(module, ParametrizationList):  # named "A.parametrizations.T"
            owner = model.get_submodule(module_name.rpartition(".")[0].rpartition(".")[0])
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{pname}" if module_name else pname
            # a Conv1d kernel is flattened (param_groups gives it batch_3d=False); other 3-D tensors
            # are judged as param_groups' own batch_3d option takes them
            flat = isinstance(owner, _CONV1D) or not batch_3d
            kind = kind_from_name(full, param.ndim, head_names, shape=param.shape, batch_3d=not flat)
            if kind != "vector" and isinstance(owner, _EMBEDDINGS):
                kind = "embedding"
            out.append((full, param, kind, owner))
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
    """Param groups for :class:`htmuon.HTMuon`: ``algorithm="htmuon"`` and ``algorithm="adamw"`` groups.

    ``nn.Conv1d`` / ``nn.ConvTranspose1d`` kernels (3-D, ``(out, in, k)``; a transposed one's is
    ``(in, out / groups, k)``) are flattened to ``out x in*k`` (``in x out/groups*k``) matrices, never
    batched as stacked matrices: the HTMuon group gets
    ``batch_3d=False`` when they are its only 3-D parameters, and they get an HTMuon group of their
    own with ``batch_3d=False`` when other 3-D parameters (stacked experts) keep ``batch_3d=True``
    (the default, or as given).

    Args:
        model: the model.
        routing: ``"standard"`` (hidden matrices -> HTMuon; embeddings, head, norms, biases -> AdamW)
            or ``"paper"`` (embeddings and head -> HTMuon too, as in the paper's LLaMA runs).
        lr, weight_decay: for the HTMuon group (``None``: the optimizer's defaults).
        adamw_lr, adamw_weight_decay: for the AdamW group (``None``: the optimizer's ``adamw_lr`` /
            ``adamw_weight_decay``, else its ``lr`` / ``weight_decay``).
        head_names: last name components marking an output head.
        **htmuon_options: further per-group options for the HTMuon group (``p``, ``method``, ...;
            ``batch_3d`` applies to the 3-D parameters other than Conv1d kernels); those the AdamW
            part reads (:data:`ADAMW_PART_OPTIONS`: ``adamw_betas``, ``adamw_eps``, ``check_finite``
            and the aliases ``betas``, ``eps``) go to the AdamW group as well.

    Returns:
        A list of group dicts (empty groups left out): the HTMuon group, the Conv1d kernels' HTMuon
        group (only beside other 3-D parameters batched), the AdamW group; each with ``names`` (the
        parameters' names, used in error messages; not torch's ``param_names``, so groups added later
        need no names).

    Example:
        >>> from htmuon import HTMuon
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
        >>> opt = HTMuon(param_groups(model, adamw_lr=1e-3), lr=0.02)
        >>> [(g["algorithm"], g["names"], g["lr"]) for g in opt.param_groups]
        [('htmuon', ['1.weight'], 0.02), ('adamw', ['0.weight', '1.bias'], 0.001)]
    """
    _check_routing(routing, "")
    to_htmuon = _KINDS_TO_HTMUON[routing]
    classified = _classify(model, head_names, not _is_false(htmuon_options.get("batch_3d", True)))
    three_d = [
        (p, isinstance(owner, _CONV1D))
        for _, p, kind, owner in classified
        if kind in to_htmuon and p.ndim == 3
    ]
    kernels = {id(p) for p, is_kernel in three_d if is_kernel}
    # batch_3d is per group: the kernels need a group of their own only beside batched 3-D parameters
    apart = not _is_false(htmuon_options.get("batch_3d", True)) and not all(k for _, k in three_d)
    hgroup: dict[str, Any] = {"params": [], "names": [], "algorithm": "htmuon", **htmuon_options}
    kgroup: dict[str, Any] = {**hgroup, "params": [], "names": [], "batch_3d": False}
    # the AdamW part's own options reach its group too, as HTMuon(..., **options) gives them to every group
    shared = {k: v for k, v in htmuon_options.items() if k in ADAMW_PART_OPTIONS}
    agroup: dict[str, Any] = {"params": [], "names": [], "algorithm": "adamw", **shared}
    if kernels and not apart:
        hgroup["batch_3d"] = False
    for name, param, kind, _ in classified:
        if kind not in to_htmuon:
            group = agroup
        else:
            group = kgroup if apart and id(param) in kernels else hgroup
        group["params"].append(param)
        group["names"].append(name)
    for group, group_lr, group_wd in (
        (hgroup, lr, weight_decay),
        (kgroup, lr, weight_decay),
        (agroup, adamw_lr, adamw_weight_decay),
    ):
        if group_lr is not None:
            group["lr"] = group_lr
        if group_wd is not None:
            group["weight_decay"] = group_wd
    groups = [g for g in (hgroup, kgroup, agroup) if g["params"]]
    if not groups:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    return groups


# --------------------------------------------------------------------------------------------
# Routing what HTMuon(params, ...) was given
# --------------------------------------------------------------------------------------------


def _check_routing(routing: Any, where: str) -> None:
    if routing not in ROUTINGS:
        raise ValueError(f"Invalid routing{where}: {routing!r}; valid: {ROUTINGS}")


def _is_real(value: Any) -> bool:
    """A real number as torch.optim takes one: a Python or NumPy real, or a 1-element real tensor."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_optional_number(key: str, value: Any, where: str) -> None:
    """None, or a number >= 0 (a tensor too: a compiled step's scheduled lr; one per group, see HTMuon)."""
    if value is None:
        return
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"Invalid {key}{where}: {value!r} (must be a finite number >= 0, or None)")


def _check_flags(group: dict[str, Any], where: str) -> None:
    """A torch.optim flag of :data:`UNSUPPORTED_FLAGS` set to a true value would be silently ignored: refused
    (by routing, and by :meth:`htmuon.HTMuon`'s check of every group at each step and load, for a flag set
    on a group after construction)."""
    for key, why in UNSUPPORTED_FLAGS.items():
        if group.get(key):
            raise ValueError(
                f"{key}={group[key]!r}{where}: HTMuon does not support it ({why}); "
                "it would be silently ignored"
            )


def _check_keys(group: dict[str, Any], where: str, known: frozenset[str]) -> None:
    """A key that is no option but close to one is a misspelling that would be silently ignored."""
    _check_flags(group, where)
    for key in group:
        if key == "process_group":  # accepted as a group key by nothing: it is the optimizer's
            raise ValueError(
                f"process_group{where} is set for the whole optimizer: pass it to HTMuon(..., "
                "process_group=...), not in a param group (where it would be silently ignored)"
            )
        if key in known or key in FOREIGN_KEYS or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise ValueError(
                f"Unknown option {key!r}{where}: did you mean {close[0]!r}? "
                "(an unknown key would be silently ignored)"
            )


def _apply_aliases(group: dict[str, Any], where: str) -> None:
    """Other optimizers' names (:data:`ALIASES`) -> HTMuon's (``betas`` -> ``adamw_betas``, ...)."""
    for alias, key in ALIASES.items():
        if alias not in group:
            continue
        value = group.pop(alias)
        # betas as a list (a JSON config) and as a tuple are the same setting
        same = (lambda v: tuple(v) if isinstance(v, list) else v) if alias == "betas" else (lambda v: v)
        if key in group and same(group[key]) != same(value):
            raise ValueError(f"{alias}={value!r} contradicts {key}={group[key]!r}{where}")
        group[key] = same(value)


def _apply_torch_muon_keys(group: dict[str, Any], where: str) -> None:
    """torch.optim.Muon's group keys: ``adjust_lr_fn`` -> ``lr_adjust``; ``ns_coefficients`` checked
    against the coefficients HTMuon runs. (Its ``eps``, the Newton--Schulz epsilon, is an alias of
    ``adamw_eps`` here, as in torch's AdamW: :data:`ALIASES`.)"""
    if "adjust_lr_fn" in group:
        value = group.pop("adjust_lr_fn")
        if not isinstance(value, (str, type(None))) or value not in TORCH_MUON_LR_ADJUST:
            raise ValueError(
                f"adjust_lr_fn={value!r}{where}: torch.optim.Muon's rules are None, 'original' and "
                "'match_rms_adamw' (HTMuon's lr_adjust 'muon' and 'adamw_rms'; lr_adjust='none' for no "
                "adjustment)"
            )
        key = TORCH_MUON_LR_ADJUST[value]
        if group.get("lr_adjust", key) != key:
            raise ValueError(
                f"adjust_lr_fn={value!r} contradicts lr_adjust={group['lr_adjust']!r}{where} "
                f"(adjust_lr_fn={value!r} is lr_adjust={key!r})"
            )
        group["lr_adjust"] = key
    if "ns_coefficients" in group:
        value = group.pop("ns_coefficients")
        try:
            same = len(value) == 3 and all(
                math.isclose(float(a), b, rel_tol=1e-6) for a, b in zip(value, TORCH_MUON_NS_COEFFICIENTS)
            )
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(
                f"ns_coefficients={value!r}{where}: HTMuon's Newton--Schulz runs Muon's "
                f"{TORCH_MUON_NS_COEFFICIENTS} only (other coefficients would be silently ignored)"
            )


def _apply_use_muon(group: dict[str, Any], where: str) -> None:
    """``use_muon`` (MuonWithAuxAdam's, pytorch-optimizer's): True -> "htmuon", False -> "adamw"."""
    if "use_muon" not in group:
        return
    use_muon = group.pop("use_muon")
    if _is_numpy_bool(use_muon):  # a config's NumPy bool, taken as HTMuon's own flags take one
        use_muon = bool(use_muon)
    if not isinstance(use_muon, bool):
        raise ValueError(f"Invalid use_muon{where}: {use_muon!r} (must be True or False)")
    want = "htmuon" if use_muon else "adamw"
    if group.get("algorithm", "auto") not in ("auto", want):
        raise ValueError(f"use_muon={use_muon} contradicts algorithm={group['algorithm']!r}{where}")
    group["algorithm"] = want


def _names_and_tensors(group: dict[str, Any]) -> tuple[list[Tensor], list[str] | None, str | None]:
    """The group's tensors, their names (from ``(name, tensor)`` pairs, ``param_names`` or ``names``)
    and the key the names go back under (``None`` without names)."""
    params = group["params"]
    items = [params] if isinstance(params, Tensor) else list(params)
    if items and all(isinstance(x, tuple) and len(x) == 2 for x in items):
        return [t for _, t in items], [str(n) for n, _ in items], "param_names"
    for key in ("param_names", "names"):
        names = group.get(key)
        if names is not None and len(names) == len(items):
            return items, [str(n) for n in names], key
    return items, None, None


def _adamw_defaults(
    group: dict[str, Any], lr: float | None, weight_decay: float | None, *, keep: Iterable[str] = ()
) -> dict[str, Any]:
    """Set the AdamW part's lr / weight decay, except the keys in ``keep`` (the group's own)."""
    for key, value in (("lr", lr), ("weight_decay", weight_decay)):
        if value is not None and key not in keep:
            group[key] = value
    return group


def route_params(
    params: Any,
    defaults: dict[str, Any],
    *,
    routing: str = "standard",
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    first_index: int = 0,
) -> Any:
    """The param groups :class:`htmuon.HTMuon` hands to ``torch.optim.Optimizer``, routed.

    Each group (bare tensors, ``(name, tensor)`` pairs or dicts, as torch accepts) is read as:

    * ``use_muon`` -> ``algorithm`` (True: ``"htmuon"``, False: ``"adamw"``; contradicting an explicit
      ``algorithm`` is an error); ``betas`` / ``eps`` / ``adamw_wd`` -> ``adamw_betas`` /
      ``adamw_eps`` / ``adamw_weight_decay``;
    * ``algorithm="auto"`` (explicit or the default) -> an ``"htmuon"`` and an ``"adamw"`` group:
      by name (:func:`kind_from_name`, ``routing``) when names are known, by shape otherwise (a
      tensor with ``ndim >= 2`` whose matrices, as the group's ``batch_3d`` views them, have no side
      of 1 is a matrix);
    * every AdamW group gets ``lr = adamw_lr`` and ``weight_decay = adamw_weight_decay`` (the group's
      own ``adamw_lr`` / ``adamw_weight_decay`` first), except an ``lr`` / ``weight_decay`` that the
      user group sets itself (a key in its dict) when the whole group is AdamW: an explicit
      ``algorithm="adamw"`` group keeps it, and so does an ``"auto"`` group all of whose parameters
      route to AdamW, unless it also sets its own ``adamw_lr`` / ``adamw_weight_decay``. In a mixed
      ``"auto"`` group the group's ``lr`` / ``weight_decay`` are the HTMuon half's. ``None`` leaves
      the group's / optimizer's ``lr`` / ``weight_decay``;
    * a key that is no option but within difflib ratio :data:`TYPO_CUTOFF` of one is an error.

    Args:
        params: what ``HTMuon`` was given. A tensor or anything else torch refuses is returned as is,
            for torch's own error.
        defaults: the optimizer's defaults (their keys are the valid options; ``algorithm`` is read).
        routing: ``"standard"`` or ``"paper"``; a group may set its own.
        adamw_lr, adamw_weight_decay: the AdamW part's defaults; a group may set its own.
        head_names: last name components marking an output head.
        first_index: the index the first group will have in ``param_groups`` (for error messages;
            :meth:`HTMuon.add_param_group` routes one group added after construction).

    Returns:
        A list of group dicts without routing keys (empty halves left out), or ``params`` unchanged.
    """
    _check_routing(routing, "")
    _check_optional_number("adamw_lr", adamw_lr, "")
    _check_optional_number("adamw_weight_decay", adamw_weight_decay, "")
    if isinstance(params, Tensor):
        return params
    items = list(params)
    if not items:
        return items
    if not all(isinstance(g, dict) for g in items):
        if any(isinstance(g, dict) for g in items):
            return items  # torch: "param_group must be a dict"
        items = [{"params": items}]
    known = frozenset(
        {
            "params",
            "param_names",
            "names",
            *defaults,
            *ROUTING_KEYS,
            *ALIASES,
            "adjust_lr_fn",
            "ns_coefficients",
        }
    )
    out: list[dict[str, Any]] = []
    made = 0, ""  # (index in out of the previous user group's first part, its `where`)
    for index, user_group in enumerate(items):
        _check_l2_flag(out[made[0] :], made[1], defaults.get("weight_decay", 0.0))
        group = dict(user_group)
        where = (
            f" in param group {first_index + index}"
            if len(items) > 1 or isinstance(user_group, dict) or first_index
            else ""
        )
        made = len(out), where
        if "params" not in group:  # (torch would say only KeyError: 'params')
            raise ValueError(
                f"no 'params'{where}: a param group needs the tensors it holds, got keys {sorted(group)}"
            )
        _check_keys(group, where, known)
        _apply_aliases(group, where)
        _apply_torch_muon_keys(group, where)
        _apply_use_muon(group, where)
        group_routing = group.pop("routing", routing)
        _check_routing(group_routing, where)
        own_lr = group.pop("adamw_lr", None)
        own_wd = group.pop("adamw_weight_decay", None)
        _check_optional_number("adamw_lr", own_lr, where)
        _check_optional_number("adamw_weight_decay", own_wd, where)
        a_lr = own_lr if own_lr is not None else adamw_lr
        a_wd = own_wd if own_wd is not None else adamw_weight_decay
        algorithm = group.get("algorithm", defaults.get("algorithm", "auto"))
        if algorithm == "adamw":
            out.append(_adamw_defaults(group, a_lr, a_wd, keep=set(group)))
            continue
        if algorithm != "auto":  # "htmuon", or an invalid value for HTMuon's own check
            if own_lr is not None or own_wd is not None:
                raise ValueError(
                    f"adamw_lr / adamw_weight_decay set nothing{where}: its algorithm is {algorithm!r}"
                )
            out.append(group)
            continue
        if isinstance(group["params"], set):  # torch's own refusal, before the list below hides the set
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the ordering of "
                "tensors in sets will change between runs. Please use a list instead."
            )
        if not isinstance(group["params"], Tensor):
            group["params"] = list(group["params"])  # a generator is read once
        tensors, names, names_key = _names_and_tensors(group)
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            out.append(group)  # empty, or something torch will refuse with its own message
            continue
        b3 = not _is_false(group.get("batch_3d", defaults.get("batch_3d", True)))
        if names is None:
            kinds = [_kind_from_shape(t.shape, b3) for t in tensors]
        else:
            kinds = [
                kind_from_name(n, t.ndim, head_names, shape=t.shape, batch_3d=b3)
                for n, t in zip(names, tensors)
            ]
        to_htmuon = _KINDS_TO_HTMUON[group_routing]
        rest = {k: v for k, v in group.items() if k not in ("params", "param_names", "names")}
        # a group routed to AdamW whole keeps the lr / weight_decay it sets (unless it sets its own
        # adamw_lr / adamw_weight_decay); in a mixed group they are the HTMuon half's
        all_adamw = not any(kind in to_htmuon for kind in kinds)
        keep = [k for k, own in (("lr", own_lr), ("weight_decay", own_wd)) if k in group and own is None]
        for half in ("htmuon", "adamw"):
            picked = [i for i, kind in enumerate(kinds) if (kind in to_htmuon) == (half == "htmuon")]
            if not picked:
                continue
            part = {**rest, "params": [tensors[i] for i in picked], "algorithm": half}
            if names_key is not None:
                part[names_key] = [names[i] for i in picked]  # type: ignore[index]
            if half == "adamw":
                _adamw_defaults(part, a_lr, a_wd, keep=keep if all_adamw else ())
            out.append(part)
    _check_l2_flag(out[made[0] :], made[1], defaults.get("weight_decay", 0.0))
    return out


def _check_l2_flag(parts: list[dict[str, Any]], where: str, default_wd: Any) -> None:
    """``decoupled_weight_decay=False`` (torch.optim.Adam's L2 penalty) on a group is refused where a part
    it became decays (the AdamW part by its own ``adamw_weight_decay`` too): HTMuon's decay is decoupled,
    the same update as the L2 penalty only at weight decay 0 (a group copied from Adam without decay)."""
    for part in parts:
        if not _is_false(part.get("decoupled_weight_decay")):
            continue
        wd = part.get("weight_decay", default_wd)
        if isinstance(wd, Tensor) and wd.numel() == 1 and not wd.is_complex():
            # a tensor decay (a scheduler's): read once per check, a host read only in this odd
            # configuration (the flag copied from Adam), as torch.optim reads tensor hyperparameters
            wd = wd.item()
        # (a weight_decay that is no number is left to the group check's own message)
        if isinstance(wd, numbers.Real) and not isinstance(wd, bool) and wd != 0:
            half = f"its {part['algorithm']} part's" if part.get("algorithm") else "its"
            raise ValueError(
                f"decoupled_weight_decay=False{where} ({half} weight_decay {wd!r}): HTMuon's weight decay "
                "is decoupled (AdamW's), not Adam's L2 penalty; remove the key (it would be silently ignored)"
            )
