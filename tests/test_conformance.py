"""One conformance suite that every HTMuon variant passes (the torch.optim contract)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from htmuon import HTMuon, param_groups

VARIANTS = {
    "svd": dict(method="svd"),
    "eigh": dict(method="eigh"),
    "ns": dict(method="ns"),
    "muon": dict(p=0.0, method="ns"),
    "rank": dict(spectrum="rank"),
    "interval": dict(interval=3),
    "normuon": dict(plugin="normuon"),
    "ht_normuon": dict(spectrum="rank", plugin="normuon"),
    "adamuon": dict(plugin="adamuon"),
    "muon_rms": dict(scale="muon_rms"),
    "adamw_rms": dict(lr_adjust="adamw_rms"),
    "plain_momentum": dict(nesterov=False, weight_decay=0.01),
}


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    return model.to(dtype)


def make_data(seed=1, n=128):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 12, generator=g)
    teacher = torch.randn(12, 4, generator=g)
    return X, torch.tanh(X @ teacher)


def make_opt(model, variant, **over):
    kw = dict(lr=0.02, weight_decay=0.0)
    kw.update(VARIANTS[variant])
    kw.update(over)
    return HTMuon(param_groups(model, adamw_lr=3e-3), **kw)


def loss_fn(model, X, Y):
    return (model(X).float() - Y).square().mean()


def train(model, opt, X, Y, steps, sched=None):
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, X, Y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param


def test_converges(variant):
    model, (X, Y) = make_model(), make_data()
    opt = make_opt(model, variant)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=150, eta_min=0.0)
    losses = train(model, opt, X, Y, 150, sched)
    assert losses[-1] < 0.1 * losses[0], (variant, losses[0], losses[-1])


def test_closure(variant):
    model, (X, Y) = make_model(), make_data()
    opt = make_opt(model, variant)
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, X, Y)
        loss.backward()
        calls.append(loss.item())
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    returned = opt.step(closure)
    assert calls and returned.item() == calls[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_preserved(variant, dtype):
    model, (X, Y) = make_model(dtype=dtype), make_data()
    opt = make_opt(model, variant)
    losses = train(model, opt, X.to(dtype), Y, 5)
    assert all(p.dtype == dtype for p in model.parameters())
    for state in opt.state.values():
        for key, value in state.items():
            if key == "step":  # torch.optim's counter: a float32 0-dim tensor, whatever the dtype
                assert value.dtype == torch.float32 and value.ndim == 0, value
            elif torch.is_tensor(value):
                assert value.dtype == dtype, (key, value.dtype)
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_state_dict_round_trip_is_bit_exact(variant):
    X, Y = make_data()
    full = make_model()
    opt_full = make_opt(full, variant)
    train(full, opt_full, X, Y, 7)

    part = make_model()
    opt_part = make_opt(part, variant)
    train(part, opt_part, X, Y, 4)
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt_resumed = make_opt(resumed, variant)
    opt_resumed.load_state_dict(saved["opt"])
    train(resumed, opt_resumed, X, Y, 3)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_drives_every_group(variant):
    model, (X, Y) = make_model(), make_data()
    opt = make_opt(model, variant, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t < 2 else 0.0)
    train(model, opt, X, Y, 2, sched)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    frozen = [p.detach().clone() for p in model.parameters()]
    train(model, opt, X, Y, 2, sched)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))


def test_add_param_group_and_zero_grad(variant):
    model, (X, _) = make_model(), make_data()
    opt = make_opt(model, variant)
    extra = nn.Linear(4, 4)
    opt.add_param_group({"params": extra.parameters(), "lr": 0.01})
    group = opt.param_groups[-1]
    assert group["p"] == opt.defaults["p"] and group["lr"] == 0.01
    extra(model(X)).sum().backward()
    w0 = extra.weight.detach().clone()
    opt.step()
    assert not torch.equal(w0, extra.weight)
    assert "momentum_buffer" in opt.state[extra.weight] and "exp_avg" in opt.state[extra.bias]
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    snapshot = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert str(opt.state_dict()) == str(snapshot)


def test_state_dict_writes_dtype_settings_as_names_and_loads_them_as_dtypes():
    """ns_dtype / compute_dtype go into the state dict as names ("float32": torch.distributed.checkpoint's
    full state dicts refuse a torch.dtype) without changing the optimizer's own groups, and a loaded
    optimizer's groups hold torch.dtype again, before any step."""
    model, (X, Y) = make_model(), make_data()
    opt = make_opt(model, "svd", ns_dtype=torch.float32, compute_dtype=torch.float64)
    train(model, opt, X, Y, 1)
    saved = opt.state_dict()
    assert {(g["ns_dtype"], g["compute_dtype"]) for g in saved["param_groups"]} == {("float32", "float64")}
    assert all(g["ns_dtype"] is torch.float32 for g in opt.param_groups)
    resumed = make_opt(make_model(), "svd")
    resumed.load_state_dict(saved)
    got = {(g["ns_dtype"], g["compute_dtype"]) for g in resumed.param_groups}
    assert got == {(torch.float32, torch.float64)}
