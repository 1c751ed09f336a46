"""Optimizers by name. Every Muon-family name is one ``htmuon.HTMuon`` object whose AdamW part
trains what is not routed to the spectral update.

| name            | what it is                                                        |
|-----------------|-------------------------------------------------------------------|
| adamw           | torch.optim.AdamW (betas 0.9/0.95; weight decay on matrices only) |
| muon            | HTMuon p=0, method "ns": Muon (Newton-Schulz polar factor)        |
| htmuon          | HTMuon p=0.125 (method from ``--method``, default "auto")         |
| htmuon-interval | HTMuon p=0.125, correction every 5th step, plain Muon otherwise   |
| normuon         | HTMuon p=0, "ns", plugin "normuon": NorMuon                       |
| htmuon-normuon  | the paper's HT + NorMuon (its scripts): U S^p V^T, then NorMuon   |
| adamuon         | HTMuon p=0, "ns", plugin "adamuon", lr_adjust "adamw_rms": AdaMuon |
| htmuon-adamuon  | ours (not in the paper's code): U S^p V^T of sign(N), then AdaMuon |

The paper's other baselines (its Figures 3-4), from maintained libraries behind the ``baselines``
extra (``pip install htmuon[baselines]``), each with its own paper's parameter routing:

| name   | implementation                                  | what it trains                              |
|--------|-------------------------------------------------|---------------------------------------------|
| mars   | pytorch_optimizer.MARS (MARS-AdamW, gamma 0.025) | every >= 2-D weight; AdamW for vectors      |
| soap   | pytorch_optimizer.SOAP (freq 10, dim <= 10000)   | everything (vectors: Adam, no preconditioner) |
| cadamw | heavyball.AdamW(caution=True): Cautious AdamW    | everything, as the ``adamw`` baseline       |
| galore | pytorch_optimizer.GaLore (rank n/4, gap 200, 0.25) | hidden 2-D matrices projected; rest Adam  |
| cosmos | htmuon.train.cosmos.COSMOS (written here)        | hidden matrices; embeddings, head, rest AdamW |

Weight decay is on matrices only for every baseline (none on norms and biases), as for ``adamw``.

Routing (``--routing``): "standard" sends embeddings, the LM head / classifier, norms and
biases to the AdamW part (what most Muon libraries do); "paper" also puts the token embedding
and the LM head in the HTMuon group, as the paper's LLaMA runs did. The default is "standard";
the gpu-60m preset uses "paper" to match the paper's setup.

Backend: the HTMuon names use the library default ``method="auto"`` (``fast`` with bfloat16 work
on GPUs and on CPUs with fast bfloat16 matmuls; ``eigh`` on other CPUs: the exact update to a few
1e-6, cheaper than Muon's NS5 there), as ``htmuon.HTMuon`` does;
``--method svd`` gives the paper's exact-SVD path (``htmuon compare --optimizers htmuon:method=svd``).
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings

import torch
from torch import nn

from htmuon.cli import UserError
from htmuon.train.config import TrainConfig

# name -> defaults (lr = the matrix part's lr; adamw: its only lr)
OPTIMIZERS: dict[str, dict] = {
    "adamw": dict(lr=1e-3),
    "muon": dict(lr=0.02, p=0.0, method="ns", spectrum="power", interval=1),
    "htmuon": dict(lr=0.03, p=0.125, method="auto", spectrum="power", interval=1),
    "htmuon-interval": dict(lr=0.03, p=0.125, method="auto", spectrum="power", interval=5),
    "normuon": dict(lr=0.02, p=0.0, method="ns", spectrum="power", interval=1, plugin="normuon"),
    # the paper's HT + NorMuon as its scripts run it (htmuon_normuon: the power spectrum S^p)
    "htmuon-normuon": dict(lr=0.03, p=0.125, method="auto", spectrum="power", interval=1, plugin="normuon"),
    # AdaMuon as published: the step's RMS is 0.2 lr (lr_adjust "adamw_rms"), hence an AdamW-scale lr
    "adamuon": dict(
        lr=0.005, p=0.0, method="ns", spectrum="power", interval=1, plugin="adamuon", lr_adjust="adamw_rms"
    ),
    "htmuon-adamuon": dict(
        lr=0.005,
        p=0.125,
        method="auto",
        spectrum="power",
        interval=1,
        plugin="adamuon",
        lr_adjust="adamw_rms",
    ),
    # baselines outside HTMuon (lr: the library's / paper's default for the matrix part)
    "mars": dict(lr=3e-3, library="pytorch_optimizer"),
    "soap": dict(lr=3e-3, library="pytorch_optimizer"),
    "cadamw": dict(lr=1e-3, library="heavyball"),
    "galore": dict(lr=1e-2, library="pytorch_optimizer"),
    "cosmos": dict(lr=1e-4, library=None),
}
#: names that are one htmuon.HTMuon object (the rest: AdamW and the baselines)
HTMUON_NAMES = tuple(name for name, spec in OPTIMIZERS.items() if "p" in spec)
#: the AdamW part's lr when neither the config nor the run's preset sets one
DEFAULT_ADAMW_LR = 1e-3

#: names with no separate AdamW part: one lr trains every parameter (``adamw_lr`` is unused)
NO_ADAMW_PART = ("adamw", "soap", "cadamw", "galore")
#: the pip package of each library a baseline comes from
LIBRARY_PACKAGES = {"pytorch_optimizer": "pytorch-optimizer", "heavyball": "heavyball"}


def check_optimizer_name(name: str) -> None:
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{name}' (choose from {', '.join(OPTIMIZERS)})")


def resolve(
    cfg: TrainConfig,
    preset_lrs: dict[str, float] | None = None,
    preset_adamw_lrs: dict[str, float] | None = None,
) -> TrainConfig:
    """Fill the optimizer's unset (None) fields with concrete values, so a saved config says
    exactly what ran: lr and AdamW-part lr from the preset's tables, else the optimizer's default
    (AdamW part: :data:`DEFAULT_ADAMW_LR`)."""
    check_optimizer_name(cfg.optimizer)
    spec = OPTIMIZERS[cfg.optimizer]
    lr = cfg.lr if cfg.lr is not None else (preset_lrs or {}).get(cfg.optimizer, spec["lr"])
    alr = cfg.adamw_lr
    if alr is None:
        alr = (preset_adamw_lrs or {}).get(cfg.optimizer, DEFAULT_ADAMW_LR)
    if cfg.optimizer not in HTMUON_NAMES:
        return dataclasses.replace(cfg, lr=lr, adamw_lr=alr)
    return dataclasses.replace(
        cfg,
        lr=lr,
        adamw_lr=alr,
        p=spec["p"] if cfg.p is None else cfg.p,
        method=spec["method"] if cfg.method is None else cfg.method,
        spectrum=spec["spectrum"] if cfg.spectrum is None else cfg.spectrum,
        interval=spec["interval"] if cfg.interval is None else cfg.interval,
    )


def backend_label(cfg: TrainConfig, device: torch.device | str) -> str | None:
    """The spectral backend that a resolved HTMuon-family config runs on ``device``, as a report
    shows it (``"fast, bf16"``, ``"eigh"``, ``"ns, fp32"``): ``method="auto"`` resolved by the hardware
    decision; ``None`` for AdamW and the other baselines."""
    if cfg.optimizer not in HTMUON_NAMES:
        return None
    from htmuon.spectral import BACKENDS, ns_working_dtype, resolve_method

    method = resolve_method(cfg.method, cfg.spectrum, device)
    label = method
    if cfg.p == 0.0 and method == "ns":
        label = "ns (NS5 polar)"
    if "ns_dtype" in BACKENDS[method].options:
        dtype = ns_working_dtype("auto", torch.device(device))
        label += ", " + {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    return label


def build_optimizer(model: nn.Module, cfg: TrainConfig, process_group=None) -> torch.optim.Optimizer:
    """The optimizer for a resolved config (``resolve`` first); ``process_group``: see ``HTMuon``."""
    check_optimizer_name(cfg.optimizer)
    betas = (cfg.adamw_beta1, cfg.adamw_beta2)
    if cfg.optimizer == "adamw":
        decay = [p for p in model.parameters() if p.requires_grad and _is_matrix(p)]
        no_decay = [p for p in model.parameters() if p.requires_grad and not _is_matrix(p)]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=1e-8)
    if cfg.optimizer not in HTMUON_NAMES:
        return build_baseline(model, cfg)
    try:
        from htmuon import HTMuon, param_groups
    except ImportError:
        raise UserError(
            f"optimizer '{cfg.optimizer}' needs htmuon.HTMuon, which this install lacks"
        ) from None
    spec = OPTIMIZERS[cfg.optimizer]
    groups = []
    routed = param_groups(model, routing=cfg.routing, adamw_lr=cfg.adamw_lr, weight_decay=cfg.weight_decay)
    for g in _tables_to_adamw(model, routed, cfg.adamw_lr, cfg.routing):
        if g["algorithm"] != "adamw":
            groups.append(g)
            continue
        # AdamW part: weight decay on its matrices (embeddings, head), none on norms and biases,
        # as in the adamw baseline
        for want_matrix, wd in ((True, cfg.weight_decay), (False, 0.0)):
            names = g.get("names") or [""] * len(g["params"])
            sel = [(n, p) for n, p in zip(names, g["params"]) if _is_matrix(p) == want_matrix]
            if sel:
                part = {**g, "params": [p for _, p in sel], "weight_decay": wd}
                if "names" in g:
                    part["names"] = [n for n, _ in sel]
                groups.append(part)
    try:
        return HTMuon(
            groups,
            lr=cfg.lr,
            p=cfg.p,
            momentum=cfg.momentum,
            nesterov=True,
            weight_decay=cfg.weight_decay,
            method=cfg.method,
            spectrum=cfg.spectrum,
            scale=cfg.scale,
            interval=cfg.interval,
            plugin=spec.get("plugin"),
            lr_adjust=spec.get("lr_adjust", "muon"),
            adamw_betas=betas,
            process_group=process_group,
        )
    except ValueError as e:  # an invalid option value from the user's config
        raise UserError(f"optimizer '{cfg.optimizer}': {e}") from None


def _is_table(param: torch.Tensor) -> bool:
    """A learned token / position table stored with a leading batch axis (a ViT's 1 x 1 x d class
    token, its 1 x tokens x d position embeddings): not a weight matrix with output channels."""
    return param.ndim >= 3 and param.shape[0] == 1


def _is_matrix(param: torch.Tensor) -> bool:
    """What weight decay applies to: matrices and conv kernels, not vectors or tables."""
    return param.ndim >= 2 and not _is_table(param)


def _tables_to_adamw(
    model: nn.Module, groups: list[dict], adamw_lr: float, routing: str = "standard"
) -> list[dict]:
    """Move :func:`_is_table` parameters from the HTMuon group to the end of the AdamW group (flattened
    to 1 x (tokens * d), they would get a rank-1 "polar factor": a normalised gradient).

    The tables that routing by name and ``ndim`` alone (htmuon 0.1) sent to HTMuon go to the end even
    where ``param_groups`` already routes them to AdamW (a 1 x 1 x d class token is a vector in
    disguise since 0.2), so the AdamW group's order, and with it a run folder's saved optimizer
    state, is the one earlier versions made (``--resume`` of an older ViT run)."""
    from htmuon.routing import _KINDS_TO_HTMUON, kind_from_name

    old_htmuon = _KINDS_TO_HTMUON[routing]
    tables = {
        id(p)
        for name, p in model.named_parameters()
        if _is_table(p) and kind_from_name(name, p.ndim) in old_htmuon
    }
    if not tables:
        return groups
    moved: list[tuple[str, torch.Tensor]] = []
    for g in groups:
        names = g.get("names") or [""] * len(g["params"])
        keep = [(n, p) for n, p in zip(names, g["params"]) if id(p) not in tables]
        moved += [(n, p) for n, p in zip(names, g["params"]) if id(p) in tables]
        g["params"], g["names"] = [p for _, p in keep], [n for n, _ in keep]
    order = {id(p): i for i, p in enumerate(model.parameters())}
    moved.sort(key=lambda item: order[id(item[1])])  # in the model's order, as they sat in the HTMuon group
    adamw = next((g for g in groups if g["algorithm"] == "adamw"), None)
    if adamw is None:
        adamw = {"params": [], "names": [], "algorithm": "adamw", "lr": adamw_lr}
        groups.append(adamw)
    adamw["params"] = adamw["params"] + [p for _, p in moved]
    adamw["names"] = list(adamw.get("names") or [""] * (len(adamw["params"]) - len(moved))) + [
        n for n, _ in moved
    ]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- the other baselines


def _require(library: str, name: str):
    """Import a baseline's library, or a one-line UserError naming the extra that installs it."""
    try:
        return importlib.import_module(library)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == library:
            package = LIBRARY_PACKAGES[library]
            raise UserError(
                f"optimizer '{name}' needs the {package} package: pip install htmuon[baselines]"
            ) from None
        # installed, but it fails to import (e.g. a release that needs a newer torch than this one)
        raise UserError(
            f"optimizer '{name}': the {LIBRARY_PACKAGES[library]} package is installed but fails to import "
            f"with torch {torch.__version__}: {type(e).__name__}: {e}"
        ) from None


def _parts(model: nn.Module, routing: str) -> tuple[list, list, list]:
    """(hidden matrices, other matrices, vectors): htmuon.routing's classes; under routing "paper"
    the embeddings and the head count as hidden matrices (as for HTMuon)."""
    from htmuon.routing import classify_parameters

    hidden_kinds = {"matrix"} if routing == "standard" else {"matrix", "embedding", "head"}
    hidden, other, vectors = [], [], []
    for _, param, kind in classify_parameters(model):
        if _is_table(param):  # a ViT's class token / position table: with the vectors (no decay: 1-D rule)
            kind = "vector"
        (vectors if kind == "vector" else hidden if kind in hidden_kinds else other).append(param)
    return hidden, other, vectors


def _decay_groups(params: list, weight_decay: float, **extra) -> list[dict]:
    """Weight decay on matrices, none on vectors (the adamw baseline's rule); empty groups left out."""
    groups = [
        {"params": [p for p in params if _is_matrix(p)], "weight_decay": weight_decay, **extra},
        {"params": [p for p in params if not _is_matrix(p)], "weight_decay": 0.0, **extra},
    ]
    return [g for g in groups if g["params"]]


def build_baseline(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """MARS, SOAP, Cautious AdamW, GaLore or COSMOS for a resolved config (see the module table)."""
    name, lr, wd = cfg.optimizer, cfg.lr, cfg.weight_decay
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "mars":
        # MARS-AdamW (the paper's main variant) on every >= 2-D weight (the paper's GPT-2 runs: the
        # embeddings and head too); its built-in AdamW (lr_1d, betas_1d) on vectors. A ViT's class
        # token / position table (>= 2-D, so MARS-AdamW) in a group of its own without weight decay
        po = _require("pytorch_optimizer", name)
        tables = [p for p in params if _is_table(p)]
        groups = [{"params": [p for p in params if not _is_table(p)]}]
        if tables:
            groups.append({"params": tables, "weight_decay": 0.0})
        return po.MARS(
            groups,
            lr=lr,
            betas=(0.95, 0.99),
            gamma=0.025,
            mars_type="adamw",
            optimize_1d=False,
            lr_1d=cfg.adamw_lr,
            betas_1d=(cfg.adamw_beta1, cfg.adamw_beta2),
            weight_decay=wd,
            weight_decay_1d=0.0,
        )
    if name == "soap":
        # SOAP on every parameter (vectors: Adam, no preconditioner), the official defaults:
        # betas 0.95/0.95, eigenbasis refreshed every 10 steps, dimensions > 10000 not preconditioned
        po = _require("pytorch_optimizer", name)
        return po.SOAP(
            _decay_groups(params, wd),
            lr=lr,
            betas=(0.95, 0.95),
            precondition_frequency=10,
            max_precondition_dim=10000,
        )
    if name == "cadamw":
        hb = _require("heavyball", name)
        if all(p.device.type == "cpu" for p in params):
            # heavyball compiles its fused step (torch.compile, max-autotune): seconds per parameter
            # shape on a CPU; the eager step computes the same update
            hb.utils.compile_mode = None
        # heavyball warns once when the lr changes between steps (supported with multi_tensor=True,
        # its default); the harness's schedule changes it every step
        warnings.filterwarnings("ignore", message="Learning rate changed between steps", category=UserWarning)
        return hb.AdamW(
            _decay_groups(params, wd),
            lr=lr,
            betas=(cfg.adamw_beta1, cfg.adamw_beta2),
            eps=1e-8,
            caution=True,
            palm=False,
        )
    if name == "galore":
        # GaLore projects the hidden 2-D weights (attention, MLP) only; embeddings, head, conv kernels
        # and vectors: plain Adam, same lr (the paper's setup; its Adam defaults 0.9/0.999, eps 1e-6)
        _require("pytorch_optimizer", name)
        hidden, other, vectors = _parts(model, "standard")
        projected = [p for p in hidden if p.ndim == 2]
        rest = [p for p in hidden if p.ndim != 2] + other + vectors
        groups = _decay_groups(rest, wd)
        if projected:
            rank = max(1, min(min(p.shape) for p in projected) // GALORE_RANK_DIVISOR)
            projection = dict(rank=rank, update_proj_gap=GALORE_UPDATE_GAP, scale=GALORE_SCALE)
            projection["projection_type"] = "std"
            groups.insert(0, {"params": projected, "weight_decay": wd, **projection})
        return _galore_class()(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    if name == "cosmos":
        from htmuon.train.cosmos import COSMOS, COSMOS_MAX_ROWS

        # COSMOS on the hidden 2-D matrices (under routing "paper" the embeddings and head too, up to
        # COSMOS_MAX_ROWS rows, the authors' rule); AdamW at adamw_lr on the rest (conv kernels too)
        hidden, other, vectors = _parts(model, cfg.routing)
        mats = [p for p in hidden if p.ndim == 2 and p.shape[0] <= COSMOS_MAX_ROWS]
        rest = [p for p in hidden if not any(p is q for q in mats)] + other + vectors
        groups = [{"params": mats, "algorithm": "cosmos", "weight_decay": wd}]
        groups += _decay_groups(rest, wd, algorithm="adamw", lr=cfg.adamw_lr)
        return COSMOS(
            [g for g in groups if g["params"]],
            lr=lr,
            betas=(cfg.adamw_beta1, cfg.adamw_beta2),
            adamw_betas=(cfg.adamw_beta1, cfg.adamw_beta2),
            weight_decay=wd,
        )
    raise AssertionError(f"no builder for optimizer '{name}'")  # OPTIMIZERS and this function disagree


#: GaLore's settings in its paper's LLaMA runs: rank = hidden / 4 (128 at 60M), projection refreshed
#: every 200 steps, the projected update scaled by 0.25
GALORE_RANK_DIVISOR = 4
GALORE_UPDATE_GAP = 200
GALORE_SCALE = 0.25


def _galore_class():
    """pytorch_optimizer.GaLore whose state_dict holds tensors only (its projector is a Python object,
    which a ``weights_only`` checkpoint load refuses): the projection matrix and the step it was
    computed at are saved, and the projector is rebuilt on load."""
    from pytorch_optimizer import GaLore
    from pytorch_optimizer.optimizer.utils.galore import GaLoreProjector

    class CheckpointableGaLore(GaLore):
        def state_dict(self):
            sd = super().state_dict()
            state = {}
            for key, s in sd["state"].items():
                s = dict(s)
                proj = s.pop("projector", None)
                if proj is not None:
                    s["projector_matrix"] = proj.ortho_matrix
                    s["projector_step"] = proj.last_svd_step
                state[key] = s
            return {**sd, "state": state}

        def load_state_dict(self, state_dict):
            saved, state = {}, {}
            for key, s in state_dict["state"].items():
                s = dict(s)
                if "projector_matrix" in s:
                    saved[key] = (s.pop("projector_matrix"), int(s.pop("projector_step")))
                state[key] = s
            super().load_state_dict({**state_dict, "state": state})
            for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
                for p, key in zip(group["params"], saved_group["params"]):
                    if key in saved:
                        matrix, step = saved[key]
                        proj = GaLoreProjector(
                            rank=group["rank"],
                            update_proj_gap=group["update_proj_gap"],
                            scale=group["scale"],
                            projection_type=group["projection_type"],
                        )
                        proj.ortho_matrix, proj.last_svd_step = matrix.to(p.device), step
                        self.state[p]["projector"] = proj

    return CheckpointableGaLore
