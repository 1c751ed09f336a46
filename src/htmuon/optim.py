"""The HTMuon optimizer: one ``torch.optim.Optimizer`` for a whole model.

Matrix parameters get the HTMuon update (momentum -> spectral map -> optional second-moment
plug-in -> shape scaling -> decoupled weight decay); every other parameter gets AdamW in the
same object. Each variant of the paper is a choice of piece in that chain, set per group.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed as _distributed
from .routing import route_params
from .spectral import (
    BACKENDS,
    MUON_NS_STEPS,
    SCALES,
    SPECTRA,
    _check_backend,
    polar,
    resolve_method,
    spectral_power,
)

__all__ = ["HTMuon", "NonFiniteGradientError"]

ALGORITHMS = ("auto", "htmuon", "adamw")
PLUGINS = (None, "normuon", "adamuon")
LR_ADJUSTS = ("muon", "adamw_rms", "none")
COMPUTE_DTYPES = (None, torch.float32, torch.float64)


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; the step was refused and nothing was changed."""


# --------------------------------------------------------------------------------------------
# Pieces of the matrix update, each a small pure function (or an in-place state update)
# --------------------------------------------------------------------------------------------


def matrix_view(t: Tensor, batch_3d: bool = True) -> Tensor:
    """View a parameter-shaped tensor as a batch of matrices ``(B, m, n)``.

    2-D: one matrix. 3-D: a batch of stacked matrices (``batch_3d=True``) or a Conv1d kernel
    flattened to ``out x (in * k)``. 4-D and more: a conv kernel flattened to ``out x (in * kh * kw)``.
    """
    return t.reshape(_distributed.matrix_shape(t.shape, batch_3d))


def lr_scale(m: int, n: int, rule: str) -> float:
    """Per-matrix learning-rate multiplier for an ``m x n`` (out x in) matrix."""
    if rule == "muon":  # Muon's: sqrt(max(1, m / n))
        return math.sqrt(max(1.0, m / n))
    if rule == "adamw_rms":  # Moonshot's "match AdamW RMS": 0.2 sqrt(max(m, n))
        return 0.2 * math.sqrt(max(m, n))
    return 1.0


def decoupled_update(param: Tensor, O: Tensor, lr: float, wd: float, scale: float) -> None:
    """``param <- (1 - lr wd) param - lr scale O`` in place (decoupled weight decay, then the step)."""
    if wd != 0.0:
        param.mul_(1.0 - lr * wd)
    param.add_(O, alpha=-lr * scale)


def count_step(state: dict[str, Any], param: Tensor) -> int:
    """Create a matrix parameter's state on first use (step 0, zero momentum), then count the step."""
    if not state:
        state["step"] = 0
        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["step"] += 1
    return state["step"]


def nesterov_momentum(grad: Tensor, buf: Tensor, beta: float, nesterov: bool) -> Tensor:
    """``buf <- beta buf + (1 - beta) grad`` in place; return ``N_t`` (Nesterov) or ``buf``."""
    buf.lerp_(grad, 1.0 - beta)
    return grad.lerp(buf, beta) if nesterov else buf


def second_moment_normalize(O: Tensor, v: Tensor, beta2: float, eps: float, kind: str) -> Tensor:
    r"""The NorMuon / AdaMuon plug-in applied to a direction ``O`` of shape ``(B, m, n)``.

    ``normuon``: ``v <- beta2 v + (1 - beta2) mean_row(O^2)`` (one entry per output neuron, i.e. per
    row); ``adamuon``: the same EMA element-wise. Then ``O <- O / sqrt(v + eps)`` rescaled to keep
    ``||O||_F``. ``v`` is updated in place.
    """
    sq = O.square()
    stat = sq.mean(dim=-1, keepdim=True) if kind == "normuon" else sq
    v.lerp_(stat.to(v.dtype), 1.0 - beta2)
    normalized = O / (v.to(O.dtype) + eps).sqrt()
    ratio = sq.sum(dim=(-2, -1), keepdim=True).sqrt() / normalized.norm(dim=(-2, -1), keepdim=True).clamp_min(
        torch.finfo(O.dtype).tiny
    )
    return normalized * ratio


def _default_names(groups: list[dict]) -> Callable[[int, int], str]:
    def name(gi: int, pi: int) -> str:
        names = groups[gi].get("param_names", groups[gi].get("names"))
        if names is not None and pi < len(names):
            return repr(names[pi])
        return f"param_groups[{gi}]['params'][{pi}]"

    return name


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
    bare tensors (``model.parameters()``) only shapes are known: every ``ndim >= 2`` tensor, embedding
    and head included, goes to HTMuon. A group's ``use_muon`` (True / False) is read as ``algorithm``
    (``"htmuon"`` / ``"adamw"``), ``betas`` / ``eps`` as ``adamw_betas`` / ``adamw_eps``; a group key
    that looks like a misspelt option is a ``ValueError``.

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
        interval: apply the correction on every ``interval``-th step of a parameter (its 1st,
            ``1 + interval``-th, ...); plain Muon (Newton--Schulz polar factor) on the others.
        plugin: ``None``, ``"normuon"`` (neuron-wise second moment) or ``"adamuon"`` (element-wise).
        beta2: EMA coefficient of the plug-in's second moment.
        plugin_eps: added to the second moment before the square root.
        ns_steps: Newton--Schulz steps of the polar factor (Muon's 5).
        ns_dtype: Newton--Schulz working dtype: ``"auto"`` (bfloat16 on CUDA as Muon, float32 on CPU,
            where bfloat16 matmul is slow), or a ``torch.dtype``.
        compute_dtype: backend working dtype (``None``: the backend's default, float32).
        adamw_betas, adamw_eps: AdamW part (the paper's 0.9/0.95 and 1e-10).
        algorithm: ``"auto"`` (matrices -> HTMuon, the rest -> AdamW), ``"htmuon"`` or ``"adamw"``.
        batch_3d: treat 3-D parameters as a batch of matrices (``True``) or flatten them as
            Conv1d kernels (``False``). 4-D+ parameters are always flattened conv kernels.
        check_finite: refuse a step whose gradients hold NaN/Inf (raises
            :class:`NonFiniteGradientError`, changes nothing); ``False`` skips the check for speed.
        process_group: divide the spectral work among the ranks of this ``torch.distributed``
            process group, the parameters being replicated on it (DDP); ``None``: every rank
            does all of it. DTensor (FSDP2) parameters are detected and always divided among
            the ranks of their device mesh (see :mod:`htmuon.distributed`). Not per group.
        routing: ``"standard"`` or ``"paper"``: where named embeddings and heads go (above).
        adamw_lr, adamw_weight_decay: ``lr`` and ``weight_decay`` of the AdamW groups that routing
            creates and of AdamW groups that set none (``None``: ``lr`` / ``weight_decay``).

    Example:
        >>> nn = torch.nn
        >>> model = nn.ModuleDict(
        ...     {"embed": nn.Embedding(100, 16), "mlp": nn.Linear(16, 16), "lm_head": nn.Linear(16, 100)}
        ... )
        >>> opt = HTMuon(model.named_parameters(), lr=0.02, adamw_lr=1e-3)  # names: routed like param_groups
        >>> [(g["algorithm"], g["param_names"]) for g in opt.param_groups]
        [('htmuon', ['mlp.weight']),
         ('adamw', ['embed.weight', 'mlp.bias', 'lm_head.weight', 'lm_head.bias'])]
        >>> [g["algorithm"] for g in HTMuon(model.parameters()).param_groups]  # bare tensors: by ndim
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
        lr: float = 0.02,
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
        )
        self._validate(defaults, where="")
        params = route_params(
            params, defaults, routing=routing, adamw_lr=adamw_lr, adamw_weight_decay=adamw_weight_decay
        )
        super().__init__(params, defaults)
        self._process_group = process_group
        self._dist = _distributed.setup(self.param_groups, process_group)

    # ---------------------------------------------------------------- validation

    @staticmethod
    def _validate(g: dict[str, Any], where: str) -> None:
        def bad(key: str, valid: str) -> ValueError:
            return ValueError(f"Invalid {key}{where}: {g[key]!r} ({valid})")

        def number(key: str) -> float:
            v = g[key]
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise bad(key, "must be a real number")
            return float(v)

        if not number("lr") >= 0.0:
            raise bad("lr", "learning rate must be >= 0")
        if not 0.0 <= number("p") <= 1.0:
            raise bad("p", "must be in [0, 1]; 0 = Muon, 1 = momentum")
        if not 0.0 <= number("momentum") < 1.0:
            raise bad("momentum", "must be in [0, 1)")
        if not number("weight_decay") >= 0.0:
            raise bad("weight_decay", "must be >= 0")
        if not 0.0 <= number("beta2") < 1.0:
            raise bad("beta2", "must be in [0, 1)")
        if not number("plugin_eps") > 0.0:
            raise bad("plugin_eps", "must be > 0")
        if not number("adamw_eps") >= 0.0:
            raise bad("adamw_eps", "must be >= 0")
        betas = g["adamw_betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise bad("adamw_betas", "must be two numbers in [0, 1)")
        if g["method"] not in BACKENDS:
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
        for key in ("interval", "ns_steps"):
            v = g[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "must be an integer >= 1")
        for key in ("nesterov", "batch_3d", "check_finite"):
            if not isinstance(g[key], bool):
                raise bad(key, "must be True or False")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            self._validate(group, where=f" in param group {index}")
            for i, param in enumerate(group["params"]):
                if group["algorithm"] == "htmuon" and param.ndim < 2:
                    raise ValueError(
                        f"param group {index} has algorithm='htmuon' but parameter {i} has shape "
                        f"{tuple(param.shape)}: HTMuon needs matrices (ndim >= 2); put it in an "
                        "algorithm='adamw' group (htmuon.param_groups does this)"
                    )
            _distributed.check_group(group, index)
        except ValueError:
            self.param_groups.pop()
            raise
        if "_dist" in self.__dict__:  # a group added after construction
            self._dist = _distributed.setup(self.param_groups, self._process_group)

    @staticmethod
    def _uses_htmuon(group: dict[str, Any], param: Tensor) -> bool:
        algorithm = group["algorithm"]
        return algorithm == "htmuon" or (algorithm == "auto" and param.ndim >= 2)

    # ---------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Gather and check everything before changing anything: a refused step changes nothing.
        work: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] = []
        name = _default_names(self.param_groups)
        finite_checks: list[tuple[Tensor, int, int]] = []
        for gi, group in enumerate(self.param_groups):
            hparams: list[Tensor] = []
            aparams: list[Tensor] = []
            for pi, param in enumerate(group["params"]):
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
                if group["check_finite"]:
                    finite_checks.append((grad, gi, pi))
                (hparams if self._uses_htmuon(group, param) else aparams).append(param)
            work.append((group, hparams, aparams))
        if finite_checks:
            if self._dist is None:
                ok = torch.stack([torch.isfinite(g).all() for g, _, _ in finite_checks])
            else:  # local shards, agreed among ranks
                ok = self._dist.finite_flags([g for g, _, _ in finite_checks])
            if not bool(ok.all()):
                _, gi, pi = finite_checks[int((~ok).nonzero()[0, 0])]
                shape = tuple(self.param_groups[gi]["params"][pi].shape)
                raise NonFiniteGradientError(
                    f"non-finite gradient (NaN or Inf) in parameter {name(gi, pi)} of shape {shape}; "
                    "the step was skipped and no parameter or optimizer state was changed "
                    "(pass check_finite=False to skip this check)"
                )

        for group, hparams, aparams in work:
            if hparams:
                self._htmuon_step(group, hparams)
            if aparams:
                self._adamw_step(group, aparams)
        return loss

    def _momentum(self, group: dict[str, Any], param: Tensor) -> Tensor:
        """Update the momentum buffer; return the (Nesterov) direction ``N_t`` as a matrix batch."""
        state = self.state[param]
        count_step(state, param)
        update = nesterov_momentum(param.grad, state["momentum_buffer"], group["momentum"], group["nesterov"])
        return matrix_view(update, group["batch_3d"])

    def _is_corrected(self, group: dict[str, Any], param: Tensor) -> bool:
        """The interval schedule: the correction runs on steps 1, 1 + k, 1 + 2k, ... of a parameter."""
        return (self.state[param]["step"] - 1) % group["interval"] == 0

    def _direction(self, group: dict[str, Any], mats: Tensor, corrected: bool) -> Tensor:
        """The spectral map on a stack of same-shape matrices ``(B, m, n)``."""
        if not corrected:
            return polar(mats, steps=group["ns_steps"], dtype=group["ns_dtype"])
        method = resolve_method(group["method"], group["spectrum"], mats.device)
        options = {k: group[k] for k in BACKENDS[method].options}  # what the backend declares
        return spectral_power(
            mats,
            float(group["p"]),  # a 1-element tensor passes validation
            method=method,
            spectrum=group["spectrum"],
            scale=group["scale"],
            **options,
        )

    def _compute_directions(
        self, group: dict[str, Any], mats: list[Tensor], corrected: list[bool]
    ) -> list[Tensor]:
        """Spectral map for every matrix batch of a group, batching same-shape matrices.

        This is the single place that does the expensive work; under DDP,
        ``DistributedStep.compute_directions`` calls it on each rank's share of the matrices. Directions
        come back in float32 (float64 for float64 work), whatever the working dtype.
        """
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, (x, c) in enumerate(zip(mats, corrected)):
            buckets[(tuple(x.shape[-2:]), x.dtype, x.device, c)].append(i)
        out: list[Tensor | None] = [None] * len(mats)
        for (_, _, _, c), idx in buckets.items():
            stack = mats[idx[0]] if len(idx) == 1 else torch.cat([mats[i] for i in idx])
            result = self._direction(group, stack, c)
            if result.dtype not in (torch.float32, torch.float64):  # e.g. bfloat16 Newton--Schulz
                result = result.float()
            for i, part in zip(idx, result.split([mats[i].size(0) for i in idx])):
                out[i] = part
        return out  # type: ignore[return-value]

    def _htmuon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if self._dist is not None and self._dist.sharded(params):  # DTensor (FSDP2) parameters
            return self._dist.sharded_htmuon_step(self, group, params)
        mats = [self._momentum(group, p) for p in params]
        corrected = [self._is_corrected(group, p) for p in params]
        if self._dist is None:
            directions = self._compute_directions(group, mats, corrected)
        else:  # replicated (DDP) parameters: each rank computes its share, then all share
            directions = self._dist.compute_directions(self, group, mats, corrected)
        lr, wd = group["lr"], group["weight_decay"]
        for param, O in zip(params, directions):
            if group["plugin"] is not None:
                O = self._apply_plugin(group, param, O)
            m, n = O.shape[-2:]
            decoupled_update(
                param, O.reshape(param.shape).to(param.dtype), lr, wd, lr_scale(m, n, group["lr_adjust"])
            )

    def _apply_plugin(self, group: dict[str, Any], param: Tensor, O: Tensor) -> Tensor:
        state = self.state[param]
        if "second_moment" not in state:
            shape = _distributed.second_moment_shape(tuple(O.shape), group["plugin"])
            state["second_moment"] = torch.zeros(shape, dtype=param.dtype, device=param.device)
        return second_moment_normalize(
            O, state["second_moment"], group["beta2"], group["plugin_eps"], group["plugin"]
        )

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["adamw_betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["adamw_eps"]
        for param in params:
            grad = param.grad
            state = self.state[param]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            bias1 = 1.0 - beta1**t
            bias2_sqrt = math.sqrt(1.0 - beta2**t)
            if wd != 0.0:
                param.mul_(1.0 - lr * wd)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias1)
