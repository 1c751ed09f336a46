"""``htmuon demo``: a one-minute sanity run on real data that ships with scikit-learn (8x8 digits).

Trains the same small MLP with AdamW, Muon (HTMuon with p = 0) and HTMuon (p = 0.125) from one seed
and prints the training loss and held-out accuracy of each. No download: scikit-learn carries the data.
"""

from __future__ import annotations

import argparse
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--method",
        default="auto",
        help="HTMuon spectral backend (default auto: the library's choice for this hardware)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fast on a busy machine, and the numbers do not change with the "
        "core count; 0 = torch's default, as htmuon train's --threads)",
    )


def _load_digits_function():
    """scikit-learn's ``load_digits``, or the UserError that says how to install it."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # depends on the environment
        from .cli import UserError

        raise UserError("the demo needs scikit-learn: pip install 'htmuon[train]'") from e
    return load_digits


def load_digits_split(seed: int = 0):
    """Digits as float tensors, standardised, split 80/20 deterministically by ``seed``."""
    import torch

    load_digits = _load_digits_function()
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    tr, te = perm[:cut], perm[cut:]
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def run_one(name: str, seed: int, epochs: int, method: str = "auto") -> dict[str, float]:
    import torch
    from torch import nn

    from . import HTMuon, param_groups

    xtr, ytr, xte, yte = load_digits_split(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    else:
        # Muon and HTMuon share one lr (0.01: best or tied-best of {0.005, 0.01, 0.02} for both on
        # two seeds); the point here is a working optimizer, not a benchmark (see `htmuon compare`).
        p = 0.0 if name == "muon" else 0.125
        groups = param_groups(model, adamw_lr=3e-3)
        opt = HTMuon(groups, lr=0.01, p=p, method="ns" if name == "muon" else method)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(model(xtr), ytr).item()
        acc = (model(xte).argmax(-1) == yte).float().mean().item()
    return {"train_loss": train_loss, "test_acc": acc, "seconds": time.perf_counter() - t0}


def main(args: argparse.Namespace) -> int:
    from .cli import UserError

    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    from . import BACKENDS

    if args.method not in BACKENDS:  # before any training, not as a traceback from the third run
        raise UserError(f"unknown --method '{args.method}' (choose from {', '.join(BACKENDS)})")
    import torch

    from .spectral import resolve_method
    from .train.loop import set_threads

    _load_digits_function()  # scikit-learn missing: the one-line error before the table's header
    set_threads(args.threads)  # as htmuon train's --threads
    backend = resolve_method(args.method, "power", "cpu")
    print(
        f"digits (scikit-learn), MLP 64-256-256-10, {args.epochs} epochs, seed {args.seed}, "
        f"torch threads {torch.get_num_threads()}"
    )
    # auto's choice for this machine, or the --method given (it read as auto's choice)
    why = f"{backend} on this CPU" if args.method == "auto" else "forced by --method"
    print(f"muon: NS5 polar factor; htmuon: method {args.method!r} ({why})")
    print(f"{'optimizer':<10} {'train loss':>11} {'test acc':>9} {'time':>7}")
    for name in ("adamw", "muon", "htmuon"):
        r = run_one(name, args.seed, args.epochs, args.method)
        print(f"{name:<10} {r['train_loss']:>11.4f} {r['test_acc']:>9.3%} {r['seconds']:>6.1f}s", flush=True)
    return 0
