"""COSMOS (Liu et al., 2025, arXiv 2502.17410), written here: no maintained library ships it.

COSMOS splits each matrix's update between a tracked rank-``r`` eigen-subspace of the gradient's
second moment ``E[G^T G]``, where it runs Adam in that basis (SOAP-like), and the orthogonal
complement, where it takes a Muon (Newton-Schulz) step. Everything else is trained by AdamW. The
algorithm follows the authors' current code (lliu606/COSMOS, ``COSMOS_optim.py`` of 2026, with its
default ``nestrov=True``); the differences are named in :class:`COSMOS`. The HTMuon paper's scripts
ran the authors' earlier ``COSMOS.py`` (``COSMOS_for_llama``, betas 0.9/0.95/0.95, ``lr_ratio``
0.25): a plain EMA momentum instead of the Nesterov-like ``N_t`` below, the Muon part weighted by
``lr_ratio`` instead of :data:`COSMOS_MUON_WEIGHT`, and no weight decay.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from htmuon.spectral import polar

#: The weight of the Muon part relative to the Adam part (the authors' code: 0.2 sqrt(mn)).
COSMOS_MUON_WEIGHT = 0.2
#: Matrices with more rows than this are trained by AdamW (the authors' rule: embeddings / LM heads
#: of a 32k-50k vocabulary).
COSMOS_MAX_ROWS = 10000


class COSMOS(Optimizer):
    r"""COSMOS: Adam in a tracked eigen-subspace plus Muon on the rest, for matrices; AdamW otherwise.

    For a matrix ``W`` (m x n, m <= ``max_rows``) with gradient ``G_t`` and basis ``U`` (n x r),
    ``r = min(rank, n)``:

    .. math::
        M_t &= \beta_1 M_{t-1} + G_t \\
        U_t &= \operatorname{QR}(\beta_2 U_{t-1} S_{t-1} + (1 - \beta_2) G_t^T G_t U_{t-1})
              \quad (U_1: \text{top-}r \text{ eigenvectors of } G_1^T G_1, \text{ largest first}) \\
        S_t &= \beta_2 T^T S_{t-1} T + (1 - \beta_2) (G_t U_t)^T (G_t U_t), \quad T = U_{t-1}^T U_t \\
        V_t &= \beta_2 V_{t-1} + (1 - \beta_2) (G_t U_t)^{\odot 2} \\
        N_t &= (G_t + \beta_1 M_t) / (1 + \beta_1 c_t), \quad c_t = (1 - \beta_1^t) / (1 - \beta_1) \\
        A_t &= \big[(N_t U_t) / (\sqrt{V_t / (1 - \beta_2^t)} + \epsilon)\big] U_t^T \\
        B_t &= \operatorname{NS}_5(N_t - N_t U_t U_t^T), \quad B_t \leftarrow B_t / \|B_t\|_F \\
        D_t &= A_t + \gamma \sqrt{mn}\, B_t \\
        W &\leftarrow W (1 - \mathrm{lr}\cdot \mathrm{wd}) - \mathrm{lr} \sqrt{mn}\, D_t / \|D_t\|_F

    so a matrix step has entry RMS ``lr``. Groups with ``algorithm="adamw"``, parameters that are not
    2-D and matrices with more than ``max_rows`` rows get AdamW (bias-corrected, decoupled decay).

    Differences from the authors' code: their group lr is the AdamW lr and matrices use
    ``lr * lr_ratio``; here each group carries its own lr (the harness gives the matrix group
    ``lr`` = their ``lr * lr_ratio`` and the AdamW group ``adamw_lr``). Their weight decay on
    matrices is ``lr * wd`` with the AdamW lr; here it is the matrix group's lr. The rank is capped
    at ``n`` (their code fails when ``n < rank``); with ``r = n`` there is no Muon part (the
    complement is empty; normalising its rounding noise would give it unit norm); the gradient is not
    modified in place.

    Args:
        params: parameters or groups; a group may set ``algorithm`` to ``"cosmos"`` (default) or
            ``"adamw"``.
        lr: learning rate (the entry RMS of a matrix step; AdamW's lr for AdamW groups).
        betas: ``(beta1, beta2)`` for the COSMOS part (the HTMuon paper's runs: 0.9, 0.95; the
            authors' README: 0.95, 0.95).
        rank: dimension of the Adam subspace (the authors': 64).
        gamma: weight of the Muon part (:data:`COSMOS_MUON_WEIGHT`).
        eps: added to the Adam denominators and norms.
        weight_decay: decoupled, ``W <- W (1 - lr wd)``.
        adamw_betas: betas of the AdamW part.
        max_rows: matrices with more rows go to AdamW (:data:`COSMOS_MAX_ROWS`).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        >>> hidden = [p for p in model.parameters() if p.ndim == 2]
        >>> rest = [p for p in model.parameters() if p.ndim < 2]
        >>> opt = COSMOS([{"params": hidden}, {"params": rest, "algorithm": "adamw", "lr": 1e-3}], lr=1e-4)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        rank: int = 64,
        gamma: float = COSMOS_MUON_WEIGHT,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        max_rows: int = COSMOS_MAX_ROWS,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            rank=rank,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            adamw_betas=tuple(adamw_betas),
            max_rows=max_rows,
            algorithm="cosmos",
        )
        _check_group(defaults, "")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` (the constructor's groups come through it too), then the group's
        values checked as the constructor's arguments; a refused group is not added."""
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1], f" in param group {len(self.param_groups) - 1}")
        except ValueError:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping a COSMOS matrix's state in float32: torch casts loaded
        state to the parameter's dtype, and the step works on a float32 copy of the gradient (a
        bfloat16 or float64 parameter's resumed step failed on mixed dtypes)."""
        kept = {}
        for saved_group in state_dict["param_groups"]:
            for key in saved_group["params"]:
                s = state_dict["state"].get(key)
                if s is not None and "basis" in s:
                    kept[key] = {k: v for k, v in s.items() if isinstance(v, Tensor)}
        super().load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, key in zip(group["params"], saved_group["params"]):
                for k, v in kept.get(key, {}).items():
                    self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)

    def _uses_cosmos(self, group: dict[str, Any], p: Tensor) -> bool:
        return group["algorithm"] == "cosmos" and p.ndim == 2 and p.shape[0] <= group["max_rows"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError("COSMOS does not support sparse gradients or complex parameters")
                if self._uses_cosmos(group, p):
                    self._cosmos_step(group, p)
                else:
                    self._adamw_step(group, p)
        return loss

    def _adamw_step(self, group: dict[str, Any], p: Tensor) -> None:
        beta1, beta2 = group["adamw_betas"]
        lr, wd, grad, state = group["lr"], group["weight_decay"], p.grad, self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if wd:
            p.mul_(1.0 - lr * wd)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - beta2**t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1**t))

    def _cosmos_step(self, group: dict[str, Any], p: Tensor) -> None:
        beta1, beta2 = group["betas"]
        eps, state = group["eps"], self.state[p]
        G = p.grad.float()
        m, n = G.shape
        r = min(group["rank"], n)
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(G)
            state["basis"] = torch.zeros(n, r, device=G.device)
            state["basis_moment"] = torch.zeros(r, r, device=G.device)
            state["exp_avg_sq"] = torch.zeros(m, r, device=G.device)
        state["step"] += 1
        t = state["step"]
        M, U, S, V = state["exp_avg"], state["basis"], state["basis_moment"], state["exp_avg_sq"]
        M.mul_(beta1).add_(G)
        if t == 1:
            _, vecs = torch.linalg.eigh(G.T @ G)
            U_new = vecs.flip(-1)[:, :r]
            GU = G @ U_new
            S_new = (1.0 - beta2) * (GU.T @ GU)
        else:
            U_new, _ = torch.linalg.qr(beta2 * (U @ S) + (1.0 - beta2) * (G.T @ (G @ U)))
            T = U.T @ U_new
            GU = G @ U_new
            S_new = beta2 * (T.T @ S @ T) + (1.0 - beta2) * (GU.T @ GU)
        U.copy_(U_new)
        S.copy_(S_new)
        V.mul_(beta2).addcmul_(GU, GU, value=1.0 - beta2)
        c = (1.0 - beta1**t) / (1.0 - beta1)
        N = (G + beta1 * M) / (1.0 + beta1 * c)
        NU = N @ U
        A = (NU / ((V / (1.0 - beta2**t)).sqrt_().add_(eps))) @ U.T
        scale = math.sqrt(m * n)
        D = A
        if r < n:  # r = n: the complement is empty (only rounding noise, which normalising would blow up)
            B = polar(N - NU @ U.T).float()
            D = A.add_(B / (B.norm() + eps), alpha=group["gamma"] * scale)
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            p.mul_(1.0 - lr * wd)
        p.add_((D / (D.norm() + eps)).to(p.dtype), alpha=-lr * scale)


def _check_group(group: dict[str, Any], where: str) -> None:
    """A ValueError naming the first invalid hyperparameter of a group (or of the defaults)."""

    def real(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    lr, rank, max_rows = group["lr"], group["rank"], group["max_rows"]
    if not (real(lr) and 0.0 < lr < math.inf):
        raise ValueError(f"Invalid learning rate: {lr!r}{where} (must be a finite number > 0)")
    for name in ("betas", "adamw_betas"):
        b = group[name]
        if len(b) != 2 or not all(real(x) and 0.0 <= x < 1.0 for x in b):
            raise ValueError(f"Invalid {name}: {b!r}{where} (two numbers in [0, 1))")
    for name, value in (("rank", rank), ("max_rows", max_rows)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r}{where} (must be an integer >= 1)")
    for name in ("gamma", "eps", "weight_decay"):
        value = group[name]
        if not (real(value) and 0.0 <= value < math.inf):
            raise ValueError(f"Invalid {name}: {value!r}{where} (must be a finite number >= 0)")
    if group["algorithm"] not in ("cosmos", "adamw"):
        raise ValueError(f"Invalid algorithm: {group['algorithm']!r}{where}; valid: ('cosmos', 'adamw')")
