"""Optimizers by name. Every Muon-family name is one ``htmuon.HTMuon`` object whose AdamW part
trains what is not routed to the spectral update.

| name            | what it is                                                        |
|-----------------|-------------------------------------------------------------------|
| adamw           | torch.optim.AdamW (betas 0.9/0.95; weight decay on matrices only) |
| muon            | HTMuon p=0, method "ns": Muon (Newton-Schulz polar factor)        |
| htmuon          | HTMuon p=0.125 (method from ``--method``, default "auto")         |
| htmuon-interval | HTMuon p=0.125, correction every 5th step, plain Muon otherwise   |
| normuon         | HTMuon p=0, "ns", plugin "normuon": NorMuon                       |
| htmuon-normuon  | the paper's HT + NorMuon plug-in: rank spectrum i^-p, then NorMuon |

Routing (``--routing``): "standard" sends embeddings, the LM head / classifier, norms and
biases to the AdamW part (what most Muon libraries do); "paper" also puts the token embedding
and the LM head in the HTMuon group, as the paper's LLaMA runs did. The default is "standard";
the gpu-60m preset uses "paper" to match the paper's setup.

Backend: the HTMuon names use the library default ``method="auto"`` (``eigh`` on CPU: the exact
update to a few 1e-6, cheaper than Muon's NS5 there; ``fast`` on GPUs), as ``htmuon.HTMuon`` does;
``--method svd`` gives the paper's exact-SVD path (``htmuon compare --optimizers htmuon:method=svd``).
"""

from __future__ import annotations

import dataclasses

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
    "htmuon-normuon": dict(lr=0.03, p=0.125, method="auto", spectrum="rank", interval=1, plugin="normuon"),
}


def check_optimizer_name(name: str) -> None:
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{name}' (choose from {', '.join(OPTIMIZERS)})")


def resolve(cfg: TrainConfig, preset_lrs: dict[str, float] | None = None) -> TrainConfig:
    """Fill the optimizer's unset (None) fields with concrete values, so a saved config says
    exactly what ran: lr from the preset's table, else the optimizer's default."""
    check_optimizer_name(cfg.optimizer)
    spec = OPTIMIZERS[cfg.optimizer]
    lr = cfg.lr if cfg.lr is not None else (preset_lrs or {}).get(cfg.optimizer, spec["lr"])
    if cfg.optimizer == "adamw":
        return dataclasses.replace(cfg, lr=lr)
    return dataclasses.replace(
        cfg,
        lr=lr,
        p=spec["p"] if cfg.p is None else cfg.p,
        method=spec["method"] if cfg.method is None else cfg.method,
        spectrum=spec["spectrum"] if cfg.spectrum is None else cfg.spectrum,
        interval=spec["interval"] if cfg.interval is None else cfg.interval,
    )


def build_optimizer(model: nn.Module, cfg: TrainConfig, process_group=None) -> torch.optim.Optimizer:
    """The optimizer for a resolved config (``resolve`` first); ``process_group``: see ``HTMuon``."""
    check_optimizer_name(cfg.optimizer)
    betas = (cfg.adamw_beta1, cfg.adamw_beta2)
    if cfg.optimizer == "adamw":
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=1e-8)
    try:
        from htmuon import HTMuon, param_groups
    except ImportError:
        raise UserError(
            f"optimizer '{cfg.optimizer}' needs htmuon.HTMuon, which this install lacks"
        ) from None
    spec = OPTIMIZERS[cfg.optimizer]
    groups = []
    for g in param_groups(model, routing=cfg.routing, adamw_lr=cfg.adamw_lr, weight_decay=cfg.weight_decay):
        if g["algorithm"] != "adamw":
            groups.append(g)
            continue
        # AdamW part: weight decay on its matrices (embeddings, head), none on norms and biases,
        # as in the adamw baseline
        for want_matrix, wd in ((True, cfg.weight_decay), (False, 0.0)):
            names = g.get("names") or [""] * len(g["params"])
            sel = [(n, p) for n, p in zip(names, g["params"]) if (p.ndim >= 2) == want_matrix]
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
            adamw_betas=betas,
            process_group=process_group,
        )
    except ValueError as e:  # an invalid option value from the user's config
        raise UserError(f"optimizer '{cfg.optimizer}': {e}") from None
