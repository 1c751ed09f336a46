"""The HTMuon optimizer: one ``torch.optim.Optimizer`` for a whole model.

Matrix parameters get the HTMuon update (momentum -> spectral map -> optional second-moment
plug-in -> shape scaling -> decoupled weight decay); every other parameter gets AdamW (torch's own
functional kernel) in the same object. Each variant of the paper is a choice of piece in that chain,
set per group. The math is in :mod:`htmuon.functional`; this module validates, plans and applies.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed as _distributed
from . import functional as F
from .functional import NonFiniteGradientError
from .routing import _check_flags, _check_l2_flag, _is_numpy_bool, _is_real, route_params
from .spectral import BACKENDS, MUON_NS_STEPS, SCALES, SPECTRA, _check_backend, host_path

__all__ = ["HTMuon", "NonFiniteGradientError"]

ALGORITHMS = ("auto", "htmuon", "adamw")
PLUGINS = (None, "normuon", "adamuon")
LR_ADJUSTS = ("muon", "adamw_rms", "none")
COMPUTE_DTYPES = (None, torch.float32, torch.float64)
#: Group settings that hold a ``torch.dtype``; :meth:`HTMuon.state_dict` writes their names (``"float32"``).
DTYPE_KEYS = ("ns_dtype", "compute_dtype")
#: Group keys every HTMuon param group carries (a loaded state dict must have them all).
GROUP_KEYS = (
    "lr",
    "p",
    "momentum",
    "nesterov",
    "weight_decay",
    "method",
    "spectrum",
    "scale",
    "lr_adjust",
    "interval",
    "plugin",
    "beta2",
    "plugin_eps",
    "ns_steps",
    "ns_dtype",
    "compute_dtype",
    "adamw_betas",
    "adamw_eps",
    "algorithm",
    "batch_3d",
    "check_finite",
    "chunk_bytes",
)
#: Group keys whose values are (or may be) strings.
_STRING_KEYS = ("method", "spectrum", "scale", "lr_adjust", "plugin", "algorithm", "ns_dtype", "chunk_bytes")
MATRIX_STATE = ("step", "momentum_buffer")
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")

# The math lives in htmuon.functional; these names stay importable from here.
matrix_view = F.matrix_view
lr_scale = F.lr_scale
second_moment_normalize = F.second_moment_normalize


def _default_names(groups: list[dict]) -> Callable[[int, int], str]:
    def name(gi: int, pi: int) -> str:
        names = groups[gi].get("param_names", groups[gi].get("names"))
        # only names that list the group's parameters one to one (ZeroRedundancyOptimizer keeps a
        # group's other keys but gives each rank a part of its parameters: position pi is another one)
        if names is not None and len(names) == len(groups[gi]["params"]):
            return repr(names[pi])
        return f"param_groups[{gi}]['params'][{pi}]"

    return name


#: The hint of a group-count / group-size mismatch in ``load_state_dict``.
_OTHER_ROUTING = (
    " (another model, routing or group layout; htmuon 0.2 routes some parameters otherwise than 0.1: "
    "vectors in disguise such as weight_norm magnitudes, parametrized weights, *_emb tables, and "
    "param_groups' Conv1d kernels: CHANGELOG.md)"
)

#: Components that wrappers insert into parameter names (torch.compile, FSDP1, activation
#: checkpointing), and DDP's / AveragedModel's leading ``module.``: not part of the model's own names.
_WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _plain_name(name: Any) -> Any:
    """A parameter name without the components wrappers insert (see :data:`_WRAPPER_COMPONENTS`)."""
    if not isinstance(name, str):
        return name
    parts = [c for c in name.split(".") if c not in _WRAPPER_COMPONENTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _warn_other_names(saved: dict[str, Any], mine: dict[str, Any], gi: int) -> None:
    """Warn where a loaded group names another parameter at a position than this optimizer's group
    (torch's ``param_names``, or ``names`` from :func:`htmuon.param_groups`): a state dict saved with
    ``state_dict()`` by an optimizer built in another order loads its state into the wrong
    parameters (as torch.optim's do, silently). Only a warning: ``torch.distributed.checkpoint``'s
    ``set_optimizer_state_dict`` maps the state by name itself, correctly, and keeps the saved names
    in the saved order. Names differing by wrapper components (:func:`_plain_name`) are the same."""
    for key in ("param_names", "names"):
        theirs, ours = saved.get(key), mine.get(key)
        if theirs is None or ours is None or len(theirs) != len(ours):
            continue
        for pi, (a, b) in enumerate(zip(theirs, ours)):
            if _plain_name(a) != _plain_name(b):
                warnings.warn(
                    f"loaded param group {gi} lists parameter {a!r} at position {pi}, where this "
                    f"optimizer has {b!r}: a state dict from state_dict() of an optimizer built in another "
                    "order loads its state into the wrong parameters (torch.distributed.checkpoint's "
                    "set_optimizer_state_dict maps by name and is right)",
                    UserWarning,
                    stacklevel=3,
                )
                return


def _autocast_on(groups: list[dict]) -> list[str]:
    """The parameters' device types where autocast is enabled (a step called inside a
    ``torch.autocast`` region, as in a whole training loop under it)."""
    on = []
    for t in sorted({p.device.type for g in groups for p in g["params"]}):
        try:
            if torch.is_autocast_enabled(t):
                on.append(t)
        except RuntimeError:  # a device type autocast does not know (meta): nothing to disable
            continue
    return on


def _scalar(v: Any) -> Any:
    """A 1-element tensor hyperparameter as torch.optim uses it (``_to_scalar``: a 0-dim tensor)."""
    return v.squeeze() if isinstance(v, Tensor) and v.dim() != 0 else v


def _number(v: Any) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def _check_algorithm_fits(
    group: dict[str, Any], params: Sequence[Tensor], where: str, first: int = 0
) -> None:
    """A ValueError if ``group`` says ``algorithm="htmuon"`` and one of ``params`` (numbered from
    ``first`` in the group) is not a matrix."""
    if group.get("algorithm") != "htmuon":
        return
    for i, param in enumerate(params, first):
        if param.ndim < 2:
            raise ValueError(
                f"{where} has algorithm='htmuon' but parameter {i} has shape {tuple(param.shape)}: "
                "HTMuon needs matrices (ndim >= 2); put it in an algorithm='adamw' group "
                "(htmuon.param_groups does this)"
            )


#: State holding averages of squares: a step in a low precision (float16) can overflow them to +Inf
#: from finite gradients (the update is then 0, as in torch.optim.AdamW), so a checkpoint may hold it.
_SQUARES = frozenset({"exp_avg_sq", "second_moment"})


def _check_loaded_values(key: str, value: Tensor, param: Tensor, where: str) -> None:
    """A ValueError if loaded state ``key`` holds NaN or Inf (+Inf in :data:`_SQUARES` is allowed),
    checked in the dtype torch.optim's ``load_state_dict`` casts it to (the parameter's, except
    ``step``), so that a float32 value beyond a float16 parameter's range is caught, not loaded as Inf;
    or if a :data:`_SQUARES` entry holds a negative value (the step's square root of it would put NaN
    into the parameter)."""
    cast = key != "step" and param.is_floating_point() and value.dtype != param.dtype
    if cast:
        value = value.to(param.dtype)
    if not bool(F.all_finite(value)) and not (
        key in _SQUARES and not bool(torch.isnan(value).any()) and not bool((value == -math.inf).any())
    ):
        dtype = str(param.dtype).replace("torch.", "")
        why = f" after the cast to the parameter's dtype {dtype}" if cast else ""
        raise ValueError(f"loaded optimizer state of {where}: {key} holds NaN or Inf{why}")
    if key in _SQUARES and bool((value < 0).any()):
        raise ValueError(
            f"loaded optimizer state of {where}: {key} holds negative values (an average of squares is >= 0)"
        )


def _dtype_names_to_dtypes(g: dict[str, Any]) -> None:
    """The dtype names of a state dict's group (``"float32"``, see :meth:`HTMuon.state_dict`) back to
    ``torch.dtype``, in place; anything else is left for the checks."""
    for key in DTYPE_KEYS:
        value = g.get(key)
        if isinstance(value, str) and value != "auto":
            dtype = getattr(torch, value.removeprefix("torch."), None)
            if isinstance(dtype, torch.dtype):
                g[key] = dtype


def _new_step() -> Tensor:
    """A fresh step counter, as torch.optim keeps it: a float32 0-dim CPU tensor (exact to 2**24 steps)."""
    return torch.tensor(0.0, dtype=torch.float32)


def _counter(state: dict[str, Any]) -> Tensor:
    """``state["step"]`` as the tensor counter the step adds to, stored so: a number (an old pickle's, or
    one set by hand, which the checks accept) becomes :func:`_new_step`'s form with its value."""
    step = state["step"]
    if not isinstance(step, Tensor):
        step = state["step"] = torch.tensor(float(step), dtype=torch.float32)
    return step


def _on_device(state: dict[str, Any], key: str, device: torch.device) -> Tensor:
    """``state[key]`` (a counter) moved to ``device`` where it is elsewhere, and stored so.

    A compiled step adds its on-device "step is good" flag to the counters without a host round trip,
    so they live on the parameters' device there (as torch.compile moves torch.optim's ``step``); an
    in-place add of a CUDA flag into a CPU counter is refused.
    """
    t = state[key]
    if t.device != device:
        t = state[key] = t.to(device)
    return t


class HTMuon(Optimizer):
    r"""HTMuon: Muon with a heavy-tailed spectral correction (arXiv 2603.10067).

    For a matrix parameter :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G_t`:

    .. math::
        \begin{aligned}
        M_t &= \beta M_{t-1} + (1 - \beta) G_t \\
        N_t &= (1 - \beta) G_t + \beta M_t \quad (\text{Nesterov; } N_t = M_t \text{ otherwise}) \\
        N_t &= U \operatorname{diag}(s) V^\top, \qquad O_t = U \operatorname{diag}(s^p) V^\top \\
        O_t &\leftarrow \operatorname{plugin}(O_t) \quad (\text{optional NorMuon / AdaMuon}) \\
        W_t &= (1 - \eta\lambda) W_{t-1} - \eta \sqrt{\max(1, m/n)}\, O_t
        \end{aligned}

    ``p = 0`` is Muon; ``p = 1`` is (Nesterov) SGD-momentum. Every other parameter is updated by
    AdamW with ``adamw_betas``, ``adamw_eps`` and the group's ``lr`` and ``weight_decay``.

    **Routing** (:mod:`htmuon.routing`): each ``algorithm="auto"`` group is split at construction into
    an ``"htmuon"`` and an ``"adamw"`` group. With names (``model.named_parameters()``) the hidden
    matrices go to HTMuon and embeddings, the output head, norms and biases to AdamW, as
    :func:`htmuon.param_groups` does (``routing="paper"``: embeddings and head to HTMuon too). With
    bare tensors (``model.parameters()``) only shapes are known: every matrix, embedding and head
    included, goes to HTMuon. A *vector in disguise* (``ndim >= 2``, but the matrices its update
    works on have a side of 1, such as weight_norm's ``(out, 1)`` magnitude) goes to AdamW either
    way. A group's
    ``use_muon`` (True / False) is read as ``algorithm`` (``"htmuon"`` / ``"adamw"``), ``betas`` /
    ``eps`` as ``adamw_betas`` / ``adamw_eps``; a group key that looks like a misspelt option is a
    ``ValueError``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups; every keyword below except
            ``process_group`` may be set per group.
        lr: learning rate (matrix part; give the AdamW group its own ``lr``).
        p: spectral exponent in [0, 1]; the paper's default is 0.125.
        momentum: momentum coefficient ``beta`` in [0, 1).
        nesterov: use the Nesterov-style update ``N_t``.
        weight_decay: decoupled weight decay ``lambda`` (multiplied by ``lr``).
        method: spectral backend, a key of :data:`htmuon.spectral.BACKENDS`.
        spectrum: ``"power"`` (``s**p``) or ``"rank"`` (``i**-p``, the paper's "HT").
        scale: ``"raw"`` (faithful: raw ``s**p``) or ``"muon_rms"`` (scale-invariant, Muon's RMS).
        lr_adjust: ``"muon"`` (``sqrt(max(1, m/n))``), ``"adamw_rms"`` (``0.2 sqrt(max(m, n))``)
            or ``"none"``.
        interval: apply the correction on every ``interval``-th step of a parameter (its
            ``interval``-th, ``2 interval``-th, ..., as the paper's code); plain Muon (Newton--Schulz
            polar factor) on the others.
        plugin: ``None``, ``"normuon"`` (NorMuon: neuron-wise second moment) or ``"adamuon"`` (AdaMuon:
            the map of the momentum's sign, an element-wise second moment, a fixed update norm).
        beta2: EMA coefficient of the plug-in's second moment (0.95, NorMuon's; AdaMuon's code uses 0.999).
        plugin_eps: added to the second moment before the square root.
        ns_steps: Newton--Schulz steps of the polar factor (Muon's 5).
        ns_dtype: Newton--Schulz working dtype: ``"auto"`` (bfloat16 where bfloat16 matmuls are fast:
            CUDA and AMX / AVX-512-BF16 CPUs; float32 on AVX2-only CPUs, where they are 30-180x slower;
            :func:`htmuon.spectral.decide`), or a ``torch.dtype``.
        compute_dtype: the backend's working dtype where it takes one (``None``: its default):
            ``svd`` float32 (float64 for float64 parameters); ``eigh`` float64; ``fast`` / ``fast5``:
            the iteration's dtype, instead of ``ns_dtype``; ``ns``: its roots' (float32; at ``p = 0``
            it is the polar factor, in ``ns_dtype``); ``interval``'s in-between polar steps always
            work in ``ns_dtype``.
        adamw_betas, adamw_eps: AdamW part (the paper's 0.9/0.95 and 1e-10).
        algorithm: ``"auto"`` (matrices -> HTMuon, the rest -> AdamW), ``"htmuon"`` or ``"adamw"``.
        batch_3d: treat 3-D parameters as a batch of matrices (``True``) or flatten them as
            Conv1d kernels (``False``). 4-D+ parameters are always flattened conv kernels.
        check_finite: refuse a step whose gradients hold NaN/Inf (raises
            :class:`NonFiniteGradientError`, changes nothing) and check every direction; ``False``
            skips both checks for speed.
        chunk_bytes: memory budget of a step's transient tensors, in bytes: same-shape matrices are
            batched in chunks, and chunks are applied in windows, within it (see *Guarantees*).
            ``"auto"`` (default): by the parameters' device
            (:func:`htmuon.functional.default_chunk_bytes`): 32 MiB on CPU, 48 MiB on an accelerator,
            where each chunk costs a fixed number of kernel launches (there 512 MiB is about 8x fewer
            operators on a 135M model, at 10x the memory: BENCHMARKS.md §A-11).
        process_group: divide the spectral work among the ranks of this ``torch.distributed``
            process group, the parameters being replicated on it (DDP); ``None``: every rank
            does all of it. DTensor (FSDP2) parameters are detected and always divided among
            the ranks of their device mesh (see :mod:`htmuon.distributed`). Not per group.
        routing: ``"standard"`` or ``"paper"``: where named embeddings and heads go (above).
        adamw_lr, adamw_weight_decay: ``lr`` and ``weight_decay`` of the AdamW groups that routing
            creates and of AdamW groups that set none (``None``: ``lr`` / ``weight_decay``). A group
            routed to AdamW whole keeps the ``lr`` / ``weight_decay`` it sets itself (a no-decay group
            of norms and biases); README's ``adamw_lr`` row has the full order.

    Guarantees (a refused step changes nothing):
        * Before anything changes, every step re-validates every group's hyperparameters (values
          edited after construction included), the optimizer state of the parameters it will touch
          (keys, shapes, and dtypes and devices: the parameters' own), and, with ``check_finite``, the
          gradients (a NaN/Inf anywhere: nothing changes, :class:`NonFiniteGradientError`).
          :meth:`load_state_dict` refuses a foreign or mismatched state dict, or non-finite state, and
          leaves the optimizer as it was.
        * Directions are computed before they are applied, window by window (:func:`htmuon.functional.
          plan_step`). A backend that raises ``LinAlgError`` or returns a non-finite direction on
          finite input is replaced, for each matrix where it fails (alone), by the exact float64 SVD
          rule (a ``RuntimeWarning`` says so); the other matrices batched with it keep their result.
          Any other failure refuses the step: if the step's directions fit in one window
          (``chunk_bytes``; every model whose matrices need at most that much) of one param group,
          nothing has changed; otherwise the groups and windows before it are applied and the error
          says how many parameters.
        * Under ``process_group`` (and with DTensor parameters) the checks, the parameters and every
          group setting, the set of parameters with gradients, and any failure are agreed among the
          ranks in the step's collectives, so the ranks refuse together (nobody waits in a
          collective another rank skipped; docs/distributed.md, "Agreement"), and so is
          :meth:`load_state_dict`; collectives run under the process group's timeout
          (``init_process_group(timeout=...)``).

    ``torch.compile(opt.step)`` (optional; single process): the step counters are tensors, so no
    recompile per step (one after the first step, which creates the state), and the finite check
    does not break the graph: a compiled step with a non-finite gradient is skipped on the device
    (``torch.where`` masks every update; the AdamW part then uses the same math written with masks)
    and counted in :attr:`skipped_steps` instead of raising, as a raise needs the host to read the
    flag (a count of this object's steps since it was made: not in :meth:`state_dict`, so a resumed
    run counts from 0). A non-finite direction from finite gradients (a backend's failure, which an
    eager step replaces by the exact SVD rule) is masked too, but only in its own window and the ones
    after it: the param groups and windows applied before it keep their update, and the step is
    counted. Give a scheduled lr as a tensor (torch's advice for compiled optimizers; a scheduler
    then changes it in place): a compiled step reads no lr on the host, so neither a graph break nor
    a recompile follows a change (a float lr, momentum or weight decay: on torch 2.13 one recompile
    when it first changes, after which dynamo takes it as an input of the graph; a dynamo that
    specialises floats recompiles for each value).
    ``interval > 1`` reads the step count on the host (a graph break per step; a graph for the
    corrected steps and one for the others, then no recompile); the backends decide their own graph
    breaks (``ns``, ``eigh`` and the default have none; ``svd`` one per SVD). The finite check is in
    the step's first graph either way, so such a step skips and counts a non-finite step as well
    (``svd``, like ``eigh``, decomposes zeros in place of a non-finite matrix and returns NaN, which
    the step masks). Only a step that dynamo stops compiling (its recompile limit) runs its checks
    eagerly and raises :class:`NonFiniteGradientError` as in eager. A compiled step keeps
    the step counters and :attr:`skipped_steps` on the parameters' device (moving CPU ones there), as
    torch.compile does with torch.optim's ``step``.

    Example:
        >>> nn = torch.nn
        >>> model = nn.ModuleDict(
        ...     {"embed": nn.Embedding(100, 16), "mlp": nn.Linear(16, 16), "lm_head": nn.Linear(16, 100)}
        ... )
        >>> opt = HTMuon(model.named_parameters(), lr=0.02, adamw_lr=1e-3)  # names: routed like param_groups
        >>> [(g["algorithm"], g["param_names"]) for g in opt.param_groups]
        [('htmuon', ['mlp.weight']),
         ('adamw', ['embed.weight', 'mlp.bias', 'lm_head.weight', 'lm_head.bias'])]
        >>> [g["algorithm"] for g in HTMuon(model.parameters()).param_groups]  # bare tensors: by shape
        ['htmuon', 'adamw']
        >>> tokens = torch.randint(0, 100, (4, 8))
        >>> logits = model["lm_head"](torch.relu(model["mlp"](model["embed"](tokens))))
        >>> torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        >>> opt.step()
    """

    _dist: _distributed.DistributedStep | None = None  # set by __init__; None: single process
    _process_group: Any = None

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 0.02,
        p: float = 0.125,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        *,
        method: str = "auto",
        spectrum: str = "power",
        scale: str = "raw",
        lr_adjust: str = "muon",
        interval: int = 1,
        plugin: str | None = None,
        beta2: float = 0.95,
        plugin_eps: float = 1e-10,
        ns_steps: int = MUON_NS_STEPS,
        ns_dtype: torch.dtype | str = "auto",
        compute_dtype: torch.dtype | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        algorithm: str = "auto",
        batch_3d: bool = True,
        check_finite: bool = True,
        chunk_bytes: int | str = "auto",
        process_group: Any = None,
        routing: str = "standard",
        adamw_lr: float | None = None,
        adamw_weight_decay: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            p=p,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            method=method,
            spectrum=spectrum,
            scale=scale,
            lr_adjust=lr_adjust,
            interval=interval,
            plugin=plugin,
            beta2=beta2,
            plugin_eps=plugin_eps,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            compute_dtype=compute_dtype,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            algorithm=algorithm,
            batch_3d=batch_3d,
            check_finite=check_finite,
            chunk_bytes=chunk_bytes,
        )
        self._validate(defaults, where="")
        #: how groups are routed: at construction and for groups added later (:meth:`add_param_group`)
        self._route_options = dict(routing=routing, adamw_lr=adamw_lr, adamw_weight_decay=adamw_weight_decay)
        params = route_params(params, defaults, **self._route_options)
        super().__init__(params, defaults)
        self._process_group = process_group
        self._dist = _distributed.setup(self.param_groups, process_group)
        #: Steps skipped on-device under ``torch.compile`` because a gradient or direction was not finite
        #: (eager steps raise :class:`NonFiniteGradientError` instead).
        self.skipped_steps = torch.zeros((), dtype=torch.int64)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups: a copy (deepcopy, pickle) would lose
        # how add_param_group routes (routing, adamw_lr, adamw_weight_decay) and the skipped steps
        return {
            **super().__getstate__(),
            "_route_options": self._route_options,
            "skipped_steps": self.skipped_steps,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # (also called by load_state_dict, with state and param_groups only)
        self.__dict__.setdefault("skipped_steps", torch.zeros((), dtype=torch.int64))
        self.__dict__.setdefault(
            "_route_options", dict(routing="standard", adamw_lr=None, adamw_weight_decay=None)
        )
        if "_dist" not in self.__dict__:  # a copy: its own step (a process group is not copied)
            self._dist = _distributed.setup(self.param_groups, None)

    # ---------------------------------------------------------------- validation

    @staticmethod
    def _validate(g: dict[str, Any], where: str) -> None:
        """Refuse any invalid hyperparameter of group ``g`` (a ValueError naming it); changes nothing."""
        missing = [k for k in GROUP_KEYS if k not in g]
        if missing:
            raise ValueError(f"param group{where} lacks the HTMuon keys {missing}")
        _dtype_names_to_dtypes(g)
        for key in _STRING_KEYS:  # a NumPy string (a sweep's np.random.choice): a Python str, as NumPy
            if isinstance(g[key], str) and type(g[key]) is not str:  # reals (weights_only loads, compile)
                g[key] = str(g[key])
        _check_flags(g, where)  # torch.optim's maximize, ... set on a group after construction
        _check_l2_flag([g], where, 0.0)

        def bad(key: str, valid: str) -> ValueError:
            return ValueError(f"Invalid {key}{where}: {g[key]!r} ({valid})")

        def check(
            key: str, low: float, high: float, valid: str, open_low: bool = False, open_high: bool = True
        ):
            v = g[key]
            if isinstance(v, Tensor):
                if v.numel() != 1:
                    raise ValueError(f"Tensor {key} must be 1-element{where}: shape {tuple(v.shape)}")
                if v.is_complex() or v.dtype == torch.bool:
                    raise bad(key, "must be a real number")
                if torch.compiler.is_compiling():  # reading the value needs the host (a graph break): a
                    return  # tensor (an lr a scheduler changes) is checked by eager steps and construction
                v = v.item()
            elif type(v) not in (int, float) and isinstance(v, numbers.Real) and not isinstance(v, bool):
                g[key] = v = float(v)  # a NumPy real: a Python float (compiled steps, weights_only loads)
            # (v != v: NaN; math.isnan of the symbolic float that dynamo makes of a float lr once its
            # value changes breaks the graph, and the step's checks then ran eagerly)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
                raise bad(key, "must be a real number")
            if v < low or (open_low and v == low) or v > high or (open_high and v == high):
                raise bad(key, valid)

        if isinstance(g["lr"], Tensor) and g["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")  # torch.optim's own message
        check("lr", 0.0, math.inf, "learning rate must be >= 0 and finite")
        check("p", 0.0, 1.0, "must be in [0, 1]; 0 = Muon, 1 = momentum", open_high=False)
        check("momentum", 0.0, 1.0, "must be in [0, 1)")
        check("weight_decay", 0.0, math.inf, "must be >= 0 and finite")
        check("beta2", 0.0, 1.0, "must be in [0, 1)")
        check("plugin_eps", 0.0, math.inf, "must be > 0 and finite", open_low=True)
        check("adamw_eps", 0.0, math.inf, "must be >= 0 and finite")
        betas = g["adamw_betas"]
        if torch.compiler.is_compiling() and isinstance(betas, tuple):
            pass  # checked, and made Python floats, by construction and eager steps (no host read here)
        elif not (
            isinstance(betas, (tuple, list))
            and len(betas) == 2
            and all(_is_real(b) and 0.0 <= _number(b) < 1.0 for b in betas)
        ):
            raise bad("adamw_betas", "must be two numbers in [0, 1)")
        elif any(type(b) is not float for b in betas):  # NumPy reals, tensors, ints: Python floats
            g["adamw_betas"] = tuple(_number(b) for b in betas)
        if not isinstance(g["method"], str) or g["method"] not in BACKENDS:
            raise bad("method", f"valid methods: {sorted(BACKENDS)}")
        if g["spectrum"] not in SPECTRA:
            raise bad("spectrum", f"valid: {SPECTRA}")
        _check_backend(g["method"], g["spectrum"])
        if g["scale"] not in SCALES:
            raise bad("scale", f"valid: {SCALES}")
        if g["lr_adjust"] not in LR_ADJUSTS:
            raise bad("lr_adjust", f"valid: {LR_ADJUSTS}")
        if g["plugin"] not in PLUGINS:
            raise bad("plugin", f"valid: {PLUGINS}")
        if g["algorithm"] not in ALGORITHMS:
            raise bad("algorithm", f"valid: {ALGORITHMS}")
        if g["ns_dtype"] != "auto" and g["ns_dtype"] not in (torch.bfloat16, torch.float16, torch.float32):
            raise bad("ns_dtype", "valid: 'auto', torch.bfloat16, torch.float16, torch.float32")
        if g["compute_dtype"] not in COMPUTE_DTYPES:
            raise bad("compute_dtype", "valid: None, torch.float32, torch.float64")
        for key in ("interval", "ns_steps", "chunk_bytes"):
            v = g[key]
            if key == "chunk_bytes" and v == "auto":
                continue
            if type(v) is not int and isinstance(v, numbers.Integral) and not isinstance(v, bool):
                g[key] = v = int(v)  # a NumPy integer (a config sweep's value): a Python int, as NumPy reals
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "must be an integer >= 1" + (" or 'auto'" if key == "chunk_bytes" else ""))
        for key in ("nesterov", "batch_3d", "check_finite"):
            if _is_numpy_bool(g[key]):
                g[key] = bool(g[key])  # a NumPy bool (a config sweep's value): a Python bool, as NumPy ints
            if not isinstance(g[key], bool):
                raise bad(key, "must be True or False")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, routed and checked as the constructor does its groups (``use_muon``, ``betas`` /
        ``eps``, ``adamw_lr``, names, misspelt keys; an ``"auto"`` group may become two groups); on an
        error no group is added."""
        if "_dist" not in self.__dict__:  # Optimizer.__init__ adding the groups route_params made
            return self._add_routed_group(param_group)
        if not isinstance(param_group, dict):  # (a list of tensors or of groups was taken as groups)
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")  # torch's message
        first = len(self.param_groups)
        groups = route_params([param_group], self.defaults, first_index=first, **self._route_options)
        try:
            for group in groups:
                self._add_routed_group(group)
            dist_step = _distributed.setup(self.param_groups, self._process_group)  # (DTensor checks)
        except Exception:
            del self.param_groups[first:]
            raise
        unshared = self._dist.unshared_failure if self._dist is not None else None
        self._dist = dist_step
        if self._dist is not None:
            self._dist.unshared_failure = unshared

    def _add_routed_group(self, param_group: Any) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        # a tensor hyperparameter (lr) that a scheduler changes in place: one per group, whether torch
        # filled it in from the defaults or routing split one group into two
        for key, value in group.items():
            if isinstance(value, Tensor) and key != "params":
                shared = value is self.defaults.get(key) or any(
                    value is g.get(key) for g in self.param_groups[:-1]
                )
                if shared:
                    group[key] = value.clone()
        try:
            self._validate(group, where=f" in param group {index}")
            _check_algorithm_fits(group, group["params"], f"param group {index}")
            _distributed.check_group(group, index)
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _uses_htmuon(group: dict[str, Any], param: Tensor) -> bool:
        algorithm = group["algorithm"]
        return algorithm == "htmuon" or (algorithm == "auto" and param.ndim >= 2)

    def _expected_state(self, group: dict[str, Any], param: Tensor) -> dict[str, tuple[int, ...]]:
        """State key -> shape that a stepped parameter of this group holds (optional keys included)."""
        shape = tuple(param.shape)
        if not self._uses_htmuon(group, param):
            return {"exp_avg": shape, "exp_avg_sq": shape}
        want = {"momentum_buffer": shape}
        if group["plugin"] is not None:
            mshape = F.matrix_shape(shape, group["batch_3d"])
            want["second_moment"] = F.second_moment_shape(mshape, group["plugin"])
        return want

    def _check_state(
        self, group: dict[str, Any], param: Tensor, state: dict[str, Any], where: str, loaded: bool = False
    ) -> None:
        """Refuse state that this group's step could not continue from (missing keys, shapes, types; and,
        unless it is ``loaded`` state, which torch.optim's ``load_state_dict`` casts to the parameter's
        dtype and device, another dtype or device than the parameter's)."""
        if not state:
            return
        want = self._expected_state(group, param)
        required = ["step", *(k for k in want if k != "second_moment")]
        missing = [k for k in required if k not in state]
        if missing:
            kind = "HTMuon matrix" if self._uses_htmuon(group, param) else "AdamW"
            raise ValueError(
                f"optimizer state of {where} (shape {tuple(param.shape)}, {kind} part) lacks {missing}; "
                f"it has {sorted(state)} (a state dict of another optimizer, or of another routing?)"
            )
        step = state["step"]
        if isinstance(step, Tensor) and torch.compiler.is_compiling():
            ok = step.numel() == 1  # reading the value would need the host (a graph break)
        elif isinstance(step, Tensor):
            value = step.item() if step.numel() == 1 and not step.is_complex() else math.nan
            ok = math.isfinite(value) and value >= 0 and value == int(value)
        else:
            ok = isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step)
            ok = ok and step >= 0 and float(step) == int(step)
        if not ok:
            raise ValueError(f"optimizer state of {where}: invalid step {step!r} (a whole number >= 0)")
        sharded = _distributed.is_dtensor(param)
        for key, shape in want.items():
            if key not in state:
                continue
            value = state[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"optimizer state of {where}: {key} has shape {got}, expected {shape}")
            if _distributed.is_dtensor(value) != sharded:
                kinds = ("a DTensor", "a plain tensor")
                raise ValueError(
                    f"optimizer state of {where}: {key} is {kinds[sharded]} but the parameter is "
                    f"{kinds[not sharded]}; load sharded (FSDP2) state with "
                    "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict(model, opt, ...)"
                )
            if not loaded and (value.dtype != param.dtype or value.device != param.device):
                # (model.to(...) after a step: the step would fail in its lerps, after earlier groups and
                # windows were applied)
                raise ValueError(
                    f"optimizer state of {where}: {key} is {value.dtype} on {value.device}, the parameter "
                    f"{param.dtype} on {param.device} (cast or moved after the state was made, as by "
                    "model.to(...)); opt.load_state_dict(opt.state_dict()) casts and moves the state to the "
                    "parameters, as torch.optim's load_state_dict does"
                )

    # ---------------------------------------------------------------- state dicts

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, the dtype settings (``ns_dtype``, ``compute_dtype``) written as their
        names (``"float32"``; :meth:`load_state_dict` reads both): torch.distributed.checkpoint's full
        state dicts (``get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True))``,
        ``htmuon.torchrun.state_dicts`` under FSDP2) refuse a ``torch.dtype`` value. The post-hooks
        (``register_state_dict_post_hook``) see, and may replace, the dict as returned: names."""
        hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()  # run below, on the dict with names
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = hooks
        for group in state_dict["param_groups"]:
            for key in DTYPE_KEYS:
                if isinstance(group.get(key), torch.dtype):
                    group[key] = str(group[key]).removeprefix("torch.")
        for post_hook in hooks.values():  # as torch.optim runs them: one may return a new dict
            out = post_hook(self, state_dict)
            if out is not None:
                state_dict = out
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`, after checking it fits this optimizer.

        Refused, with a ValueError naming the problem and the optimizer left as it was: a state dict
        of another optimizer (``torch.optim.AdamW``, ``Muon``: its groups lack HTMuon's keys), other
        group sizes, invalid hyperparameters, state whose keys or shapes do not fit the parameters,
        non-finite state. Old checkpoints whose ``step`` is a Python int still load.

        Under a process group or with DTensor (FSDP2) parameters every rank must call it (as
        ``torch.distributed.checkpoint``'s ``set_optimizer_state_dict`` does): each rank checks what
        it holds (its shards), then one small ``all_reduce`` agrees on the outcome, so that where one
        rank refuses (a NaN in its shard, say) every rank refuses and none changes anything.
        """
        if self._dist is None:
            self._load_checked(state_dict)
            return self._run_load_post_hooks()
        before = self.state, self.param_groups
        error = None
        try:
            self._load_checked(state_dict)
        except Exception as exc:  # agreed below, so that the ranks load together or not at all
            error = exc
        device = next(
            (_distributed.local_tensor(p).device for g in self.param_groups for p in g["params"]),
            torch.device("cpu"),
        )
        refused = self._dist.agree_on_load(error is not None, device)
        if refused:
            self.state, self.param_groups = before
            if error is not None:
                raise error
            raise ValueError(
                f"rank(s) {refused} refused this state dict (see their error); it was loaded on no rank "
                "and the optimizer is as it was"
            )
        self._dist.unshared_failure = None  # the state was restored: the ranks agree again
        self._run_load_post_hooks()

    def _run_load_post_hooks(self) -> None:
        """The load-state-dict post-hooks, once the load is complete: they see the groups' dtype
        settings as ``torch.dtype`` and the optimizer's own step counters (not the names and the
        caller's counters that torch.optim's ``load_state_dict`` leaves, which :meth:`_load_checked`
        then converts)."""
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_checked(self, state_dict: dict[str, Any]) -> None:
        """:meth:`load_state_dict` on this rank: the pre-hooks, the checks, the load (the caller runs
        the post-hooks)."""
        if isinstance(state_dict, dict):  # the pre-hooks may rewrite it (as in torch), then it is checked
            state_dict = state_dict.copy()
            for hook in self._optimizer_load_state_dict_pre_hooks.values():
                out = hook(self, state_dict)
                if out is not None:
                    state_dict = out
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        for gi, saved in enumerate(saved_groups):  # before the layout: its hint would mislead here
            missing = [k for k in GROUP_KEYS if k not in saved]
            if missing:
                raise ValueError(
                    f"not an HTMuon state dict: loaded param group {gi} lacks the keys {missing} "
                    "(a state dict of another optimizer such as torch.optim.AdamW or Muon?)"
                )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}{_OTHER_ROUTING}"
            )
        name = _default_names(self.param_groups)
        lookup: dict[Any, tuple[int, int]] = {}
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"loaded param group {gi} has {len(saved['params'])} parameters, this optimizer's "
                    f"has {len(mine['params'])}{_OTHER_ROUTING}"
                )
            _warn_other_names(saved, mine, gi)
            self._validate(dict(saved), where=f" in loaded param group {gi}")  # (it may convert values)
            if saved.get("algorithm") == "htmuon" and mine.get("algorithm") != "htmuon":
                # groups of equal sizes in another order: say so, not how to build the groups
                vector = next((q for q in mine["params"] if q.ndim < 2), None)
                if vector is not None:
                    raise ValueError(
                        f"loaded param group {gi} is an algorithm='htmuon' group, this optimizer's group "
                        f"{gi} is algorithm={mine.get('algorithm')!r} and holds a parameter of shape "
                        f"{tuple(vector.shape)} that HTMuon cannot update: were the groups saved in "
                        f"another order?{_OTHER_ROUTING}"
                    )
            _check_algorithm_fits(saved, mine["params"], f"loaded param group {gi}")
            lookup.update({pid: (gi, pi) for pi, pid in enumerate(saved["params"])})
        for pid, state in state_dict["state"].items():
            if pid not in lookup:
                raise ValueError(
                    f"loaded state dict has state for parameter id {pid!r}, which no group lists"
                )
            gi, pi = lookup[pid]
            param = self.param_groups[gi]["params"][pi]
            where = f"parameter {name(gi, pi)}"
            self._check_state(saved_groups[gi], param, state, where, loaded=True)
            for key, value in state.items():
                _distributed.check_state_layout(param, key, value, saved_groups[gi], where)
                if isinstance(value, Tensor) and value.is_floating_point():
                    _check_loaded_values(key, _distributed.local_tensor(value), param, where)
        hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # they already ran above
        self._optimizer_load_state_dict_post_hooks = OrderedDict()  # the caller runs them after the load
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks
        for group in self.param_groups:
            _dtype_names_to_dtypes(group)
        for state in self.state.values():
            # a fresh counter each: an old checkpoint's int becomes torch.optim's tensor, and a loaded
            # tensor is not shared with the caller's dict (counting in place would change it there)
            if "step" in state:
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)

    # ---------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step(_autocast_on(self.param_groups))
        return loss

    def _step(self, autocast_on: list[str]) -> None:
        """The step itself (see :meth:`step`), with autocast disabled on the device types in
        ``autocast_on``: the step's products then run in the backends' own dtypes, not autocast's
        (float16 autocast made the bfloat16 ``fast`` products fail on mixed operands; bfloat16 autocast
        rounded the exact backends' float32 / float64 products). Nested ``with`` blocks, one per type,
        which torch.compile traces (a ``contextlib.ExitStack`` of them breaks its graph)."""
        if autocast_on:
            with torch.autocast(autocast_on[0], enabled=False):
                return self._step(autocast_on[1:])
        # 1) check everything before changing anything: a refused step changes nothing
        try:
            work, finite_checks = self._gather()
            error = None
        except (ValueError, RuntimeError) as exc:
            if self._dist is None:
                raise
            work, finite_checks, error = [], [], exc  # refused together with the other ranks below
        if self._dist is not None:
            agreed = self._dist.agree(self.param_groups, error, self.state)
            located = [(gi, pi) for gi, g in enumerate(self.param_groups) for pi in range(len(g["params"]))]
            if torch.compiler.is_compiling():
                index = {where: i for i, where in enumerate(located)}
                flags = agreed[[index[gi, pi] for _, gi, pi in finite_checks]] if finite_checks else None
            else:
                # eager: refused from the agreed flags alone (the same on every rank), not from the
                # checks this rank made: a rank that skipped a check must not enter the step's
                # collectives while the others refuse it
                flags = agreed.tolist()
                finite_checks = [(None, gi, pi) for gi, pi in located]
        elif finite_checks and all(
            host_path(g.device) for g, _, _ in finite_checks
        ):  # CPU, eager: read each check on the host (no 0-d tensor ops; see F.is_finite)
            flags = [F.is_finite(g) for g, _, _ in finite_checks]
        elif finite_checks and not torch.compiler.is_compiling():  # accelerators: one foreach screen
            flags = F.finite_flags([g for g, _, _ in finite_checks]).tolist()
        elif finite_checks:
            flags = torch.stack([F.all_finite(g) for g, _, _ in finite_checks])
        else:
            flags = None
        # eager: flags is a list of bools, read on the host once; compiled: a tensor, never read
        ok = None  # under torch.compile: the on-device "step is good" flag that masks every update
        if flags is not None and torch.compiler.is_compiling():
            ok = flags.all()
        elif flags is not None and not all(flags):
            _, gi, pi = finite_checks[flags.index(False)]
            shape = tuple(self.param_groups[gi]["params"][pi].shape)
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN or Inf) in parameter {_default_names(self.param_groups)(gi, pi)} "
                f"of shape {shape}; the step was skipped and no parameter or optimizer state was "
                "changed (pass check_finite=False to skip this check)"
            )

        # 2) the matrix part, window by window (compute, check, then apply); 3) the AdamW part. A failure
        # after some windows (of this group or an earlier one) were applied says how many parameters.
        # Distributed: a failure of this rank that the others do not know of yet (after an exchange)
        # is carried to its next exchange in the step, where every rank refuses the step; after the
        # step's last exchange, to the next step's agreement.
        applied, failed = 0, None
        for group, hparams, _ in work:
            if not hparams or (failed is not None and not self._dist.exchanges(hparams)):
                continue
            try:
                # the gradients read here, in the step's own frame: a frame that resumes after a graph
                # break (interval, svd) and reads them from the parameters guards on each gradient's
                # identity, so a compiled step recompiled on every step (a new gradient) up to dynamo's limit
                grads = [p.grad for p in hparams]
                ok, applied = self._htmuon_step(group, hparams, grads, ok, applied, failed)
            except _distributed.UnsharedFailure as exc:
                failed, applied, failed_group = exc.error, exc.applied, group
                self._dist.note_unshared_failure(failed)
        if failed is not None:
            if not applied:
                raise failed
            raise F.partial_step_error(failed, applied, failed_group["chunk_bytes"]) from failed
        for group, _, aparams in work:
            if aparams:
                try:
                    self._adamw_step(group, aparams, [p.grad for p in aparams], ok)
                except Exception as exc:
                    if self._dist is not None:  # the other ranks (no collective here) went on
                        self._dist.note_unshared_failure(exc)
                    if not applied:
                        raise
                    raise F.partial_step_error(exc, applied, group["chunk_bytes"]) from exc
                applied += len(aparams)
        if ok is not None:
            if self.skipped_steps.device != ok.device:  # see _on_device
                self.skipped_steps = self.skipped_steps.to(ok.device)
            self.skipped_steps.add_((~ok).to(self.skipped_steps.dtype))

    def _gather(self) -> tuple[list[tuple[dict, list[Tensor], list[Tensor]]], list[tuple[Tensor, int, int]]]:
        """Validate groups, gradients and state; sort parameters into the two parts. Changes nothing."""
        work: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] = []
        name = _default_names(self.param_groups)
        finite_checks: list[tuple[Tensor, int, int]] = []
        for gi, group in enumerate(self.param_groups):
            self._validate(group, where=f" in param group {gi}")
            hparams: list[Tensor] = []
            aparams: list[Tensor] = []
            for pi, param in enumerate(group["params"]):
                if param.ndim < 2 and group["algorithm"] == "htmuon":  # an edited algorithm: refused
                    _check_algorithm_fits(group, (param,), f"param group {gi}", pi)
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        f"HTMuon does not support sparse gradients (parameter {name(gi, pi)}, "
                        f"shape {tuple(param.shape)})"
                    )
                if torch.is_complex(param) or torch.is_complex(grad):
                    raise RuntimeError(
                        f"HTMuon does not support complex parameters or gradients (parameter "
                        f"{name(gi, pi)}, shape {tuple(param.shape)})"
                    )
                if grad.shape != param.shape:
                    raise RuntimeError(
                        f"gradient of shape {tuple(grad.shape)} for parameter {name(gi, pi)} of shape "
                        f"{tuple(param.shape)}"
                    )
                if param in self.state:
                    self._check_state(group, param, self.state[param], f"parameter {name(gi, pi)}")
                # eager meta parameters (shape-only dry runs): no values to read, no check
                if group["check_finite"] and (grad.device.type != "meta" or torch.compiler.is_compiling()):
                    finite_checks.append((grad, gi, pi))
                if not self._uses_htmuon(group, param):
                    aparams.append(param)
                elif param.numel():  # an empty matrix (nn.Linear(0, m)) has nothing to update: no state
                    hparams.append(param)
            work.append((group, hparams, aparams))
        return work, finite_checks

    def _step_count(self, param: Tensor) -> int:
        """Steps this parameter has taken so far (0 if it has no state yet)."""
        state = self.state.get(param)
        return int(state["step"]) if state else 0

    def _htmuon_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        ok: Tensor | None,
        applied: int = 0,
        failed: BaseException | None = None,
    ) -> tuple[Tensor | None, int]:
        """The matrix part of one group, after ``applied`` parameters of this step were updated; returns
        ``ok`` (compiled: and-ed with the directions' check) and the parameters updated so far.

        Distributed: a failure that every rank learns in an exchange is raised on every rank; one of
        this rank alone after the group's last exchange (or in a group that exchanges nothing) raises
        :class:`htmuon.distributed.UnsharedFailure`, for the caller to carry to the next exchange.
        ``failed``: such a failure earlier in the step: the group's first exchange tells the others, and
        every rank raises. ``grads``: the parameters' gradients, as the step read them before any graph
        break (see :meth:`_step`)."""
        if self._dist is not None and self._dist.sharded(params):  # DTensor (FSDP2) parameters
            return ok, self._dist.sharded_htmuon_step(self, group, params, applied, failed)
        batch_3d, interval = group["batch_3d"], group["interval"]
        mshapes = [F.matrix_shape(p.shape, batch_3d) for p in params]
        corrected = [interval == 1 or F.is_corrected(self._step_count(p) + 1, interval) for p in params]
        keys = [(s[1:], p.dtype, p.device, c) for s, p, c in zip(mshapes, params, corrected)]
        itemsizes = [p.element_size() for p in params]
        work = [F.work_itemsize(group, c, p) for p, c in zip(params, corrected)]
        budget = F.chunk_budget(group["chunk_bytes"], params[0].device)
        owners = None
        if self._dist is not None and self._dist.divides():  # DDP: owners for the whole step
            plan, owners = self._dist.plan(keys, mshapes, itemsizes, budget, work)
        else:
            plan = F.plan_step(keys, mshapes, itemsizes, budget, work)
        # distributed, but every rank steps this group alone: any failure here is this rank's alone
        alone = self._dist is not None and owners is None
        scratch: dict[torch.dtype, Tensor] = {}  # pipelined steps: N_t of one matrix at a time, per dtype
        for window in plan.windows:
            items = [i for chunk in window for i in chunk]
            try:
                sizes = [len(chunk) for chunk in window]
                pending = self._compute_window(
                    group,
                    [params[i] for i in items],
                    [grads[i] for i in items],
                    [corrected[i] for i in items],
                    sizes,
                    scratch,
                    None if owners is None else [owners[i] for i in items],
                    failed,
                )
            except _distributed.UnsharedFailure as exc:  # DDP, after the window's exchange
                failed = exc.error
                self._dist.note_unshared_failure(failed)
                continue
            except Exception as exc:
                if alone:
                    raise _distributed.UnsharedFailure(exc, applied) from exc
                if not applied:
                    raise
                raise F.partial_step_error(exc, applied, group["chunk_bytes"]) from exc
            try:
                if ok is not None:  # compiled: a non-finite direction masks this window and the rest
                    ok = ok & torch.stack([F.all_finite(O) for _, O, _, _ in pending]).all()
                self._apply_window(group, pending, [grads[i] for i in items], ok)
            except Exception as exc:
                if self._dist is None:
                    raise
                failed = exc  # this rank's alone: told at the next exchange
                self._dist.note_unshared_failure(failed)
                if alone:
                    break
                continue
            finally:
                del pending  # the window's directions: not alive while the next window is computed
            applied += len(items)
        if failed is not None:
            raise _distributed.UnsharedFailure(failed, applied)
        return ok, applied

    def _compute_window(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        corrected: list[bool],
        chunks: list[int],
        scratch: dict[tuple, Tensor] | None = None,
        owners: list[int] | None = None,
        failed: BaseException | None = None,
    ) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]:
        """Directions (and new plug-in moments) of a window's parameters, ``chunks`` items at a time
        (DDP: each rank's owned share of the window at once; on CPU, eager: one at a time, each right
        after its momentum direction, so that only the directions stay alive); nothing is changed.

        DDP (``owners`` given): a failure of this rank before the window's exchange (a new momentum
        buffer, its momentum directions, its share of the directions; or ``failed``, one earlier in
        the step) is sent in the exchange, after which every rank raises; one after it (unpacking the
        directions, the plug-in) raises :class:`htmuon.distributed.UnsharedFailure`."""
        beta, nesterov, batch_3d = _number(group["momentum"]), group["nesterov"], group["batch_3d"]
        bufs = []
        mats = []
        pipelined = self._dist is None and len(params) > 0 and not F.stacks_matrices(params[0].device)
        directions = []
        scratch = {} if scratch is None else scratch
        rank = self._dist.replicated_rank() if owners is not None else 0
        error = failed
        try:
            for i, (p, c) in enumerate(zip(params, corrected) if error is None else ()):
                state = self.state.get(p)
                buf = (
                    state["momentum_buffer"]
                    if state
                    else torch.zeros_like(p, memory_format=torch.preserve_format)
                )
                bufs.append(buf)
                if pipelined:
                    # CPU, eager: each direction right after its N_t, so only the directions stay alive;
                    # N_t in one buffer per dtype, as large as the group's largest matrix, reused by
                    # every matrix
                    flat = scratch.get(p.dtype)
                    if flat is None or flat.numel() < p.numel():
                        numel = max(q.numel() for q in params if q.dtype == p.dtype)
                        flat = scratch[p.dtype] = torch.empty(numel, dtype=p.dtype, device=p.device)
                    work = flat[: p.numel()].view(p.shape)
                    N = F.matrix_view(F.momentum_direction(grads[i], buf, beta, nesterov, out=work), batch_3d)
                    (O,) = F.compute_directions([F.plugin_input_(N, group["plugin"])], [c], group)
                    if O.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
                        O = O.clone()  # a backend that returned (a view of) its input: out of the buffer
                    directions.append(O)
                    del N
                elif owners is not None and owners[i] != rank:
                    # DDP: another rank computes this matrix's direction; only its shape and dtype are read
                    mats.append(torch.empty(F.matrix_shape(p.shape, batch_3d), dtype=p.dtype, device="meta"))
                elif self._dist is not None:
                    N = F.matrix_view(F.momentum_direction(grads[i], buf, beta, nesterov), batch_3d)
                    mats.append(F.plugin_input_(N, group["plugin"]))
                    del N
        except Exception as exc:
            if owners is None:
                raise
            error = exc  # DDP: sent in the window's exchange, so that no rank waits for this one
        if error is not None:  # DDP: only the shapes and dtypes, to take part in the exchange
            bufs = []
            mats = [
                torch.empty(F.matrix_shape(p.shape, batch_3d), dtype=p.dtype, device="meta") for p in params
            ]
        if not pipelined and self._dist is None:
            # accelerators, compiled steps: one backend call per chunk of the plan (same shape and
            # schedule), its N_t built on the stacked buffers and gradients (four operators per chunk,
            # whatever its length) only when the chunk is computed
            start, check = 0, bool(group["check_finite"])
            for size in chunks:
                part = slice(start, start + size)
                stack = F.stacked_momentum_directions(grads[part], bufs[part], beta, nesterov, batch_3d)
                O = F.safe_direction(F.plugin_input_(stack, group["plugin"]), group, corrected[start], check)
                del stack
                if group["plugin"] is None and all(p.ndim == 2 for p in params[part]):
                    directions += O.unbind(0)  # each (m, n): the parameter's shape, no view per matrix
                else:
                    directions += O.split([F.matrix_shape(p.shape, batch_3d)[0] for p in params[part]])
                start += size
        elif not pipelined:  # replicated (DDP) parameters: each rank computes its share, then all share
            device = params[0].device if params else None
            directions = self._dist.compute_directions(group, mats, corrected, owners, device, error)
        del mats
        if owners is None:
            return self._with_plugin(group, params, bufs, directions)
        try:
            return self._with_plugin(group, params, bufs, directions)
        except Exception as exc:  # after the exchange: this rank's alone
            raise _distributed.UnsharedFailure(exc) from exc

    def _with_plugin(
        self, group: dict[str, Any], params: list[Tensor], bufs: list[Tensor], directions: list[Tensor]
    ) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]:
        """``(parameter, direction, momentum buffer, new plug-in moment)`` per parameter: the plug-in
        (NorMuon / AdaMuon, if any) applied to its direction, out of place."""
        out = []
        for p, buf, O in zip(params, bufs, directions):
            v_new = None
            if group["plugin"] is not None:
                state = self.state.get(p)
                v = state.get("second_moment") if state else None
                if v is None:
                    shape = F.second_moment_shape(tuple(O.shape), group["plugin"])
                    v = torch.zeros(shape, dtype=p.dtype, device=p.device)
                O, v_new = F.second_moment_normalize(
                    O, v, group["beta2"], group["plugin_eps"], group["plugin"]
                )
            out.append((p, O, buf, v_new))
        return out

    def _apply_window(
        self, group: dict[str, Any], pending: list, grads: list[Tensor], ok: Tensor | None = None
    ) -> None:
        """Store momentum, step count and plug-in moment, then update the parameters (in place).

        ``ok`` (compiled steps only): a bool tensor; where ``False`` nothing changes (``torch.where``),
        so no host synchronisation is needed to skip a bad step.
        """
        wd, beta = float(group["weight_decay"]), _number(group["momentum"])
        if (
            torch.compiler.is_compiling()
        ):  # a tensor lr (what a scheduler changes) stays a tensor: no host read
            if ok is None:  # check_finite=False
                ok = torch.ones((), dtype=torch.bool, device=pending[0][0].device if pending else None)
            return self._apply_window_masked(group, pending, grads, ok, _scalar(group["lr"]), wd, beta)
        lr = _number(group["lr"])
        if ok is not None:
            return self._apply_window_masked(group, pending, grads, ok, lr, wd, beta)
        params, states = [p for p, _, _, _ in pending], [self.state[p] for p, _, _, _ in pending]
        for state, (_, _, buf, v_new) in zip(states, pending):
            if not state:
                state["step"] = _new_step()
                state["momentum_buffer"] = buf
            else:
                _counter(state)  # a number set by hand: the counter's tensor form
            if v_new is not None:
                if "second_moment" in state:
                    state["second_moment"].copy_(v_new)
                else:
                    state["second_moment"] = v_new
        # the window's momenta, step counts and weight decay in one foreach call each (fewer launches)
        F.commit_momenta_([s["momentum_buffer"] for s in states], grads, beta)
        torch._foreach_add_([s["step"] for s in states], 1)
        F.decoupled_updates_(
            params,
            [O if O.shape == p.shape else O.reshape(p.shape) for p, O, _, _ in pending],
            lr,
            wd,
            [F.lr_scale(*O.shape[-2:], group["lr_adjust"]) for _, O, _, _ in pending],
        )

    def _apply_window_masked(
        self,
        group: dict[str, Any],
        pending: list,
        grads: list[Tensor],
        ok: Tensor,
        lr: float | Tensor,
        wd: float,
        beta: float,
    ) -> None:
        for (p, O, buf, v_new), grad in zip(pending, grads):
            state = self.state[p]
            if not state:
                state["step"] = _new_step()
                state["momentum_buffer"] = buf
            m_buf = state["momentum_buffer"]
            m_buf.copy_(torch.where(ok, m_buf.lerp(grad, 1.0 - beta), m_buf))
            _counter(state)
            counter = _on_device(state, "step", ok.device)
            counter.add_(ok.to(counter.dtype))
            if v_new is not None:
                if "second_moment" not in state:
                    state["second_moment"] = torch.zeros_like(v_new)
                state["second_moment"].copy_(torch.where(ok, v_new, state["second_moment"]))
            m, n = O.shape[-2:]
            step = O.reshape(p.shape).to(p.dtype) * (lr * F.lr_scale(m, n, group["lr_adjust"]))
            p.copy_(torch.where(ok, p * (1.0 - lr * wd) - step, p))

    def _adamw_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], ok: Tensor | None = None
    ) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for param in params:
            state = self.state[param]
            if not state:  # as torch.optim.AdamW lays it out
                state["step"] = _new_step()
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            counter = _counter(state)  # a number set by hand: torch's AdamW kernels take tensors only
            steps.append(counter if ok is None else _on_device(state, "step", ok.device))
        hyper = dict(
            lr=_scalar(group["lr"]),
            betas=tuple(float(b) for b in group["adamw_betas"]),
            eps=float(group["adamw_eps"]),
            weight_decay=float(group["weight_decay"]),
        )
        if ok is not None:  # compiled, checked step: the same math, masked on-device
            F.adamw_masked(params, grads, exp_avgs, exp_avg_sqs, steps, ok, **hyper)
        else:
            F.adamw(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)
