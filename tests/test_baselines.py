"""The paper's baselines in the harness: AdaMuon / NorMuon plug-ins, MARS, SOAP, Cautious AdamW,
GaLore, COSMOS: each runs end to end and resumes exactly; routing; a clear error without the extra;
COSMOS's update checked against its definition."""

from __future__ import annotations

import importlib
import io
import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from helpers import TINY_RUN, baseline_library_error, flags, skip_without_library  # noqa: E402
from htmuon.cli import UserError  # noqa: E402
from htmuon.cli import main as cli_main  # noqa: E402
from htmuon.train import checkpoint  # noqa: E402
from htmuon.train.config import TrainConfig  # noqa: E402
from htmuon.train.cosmos import COSMOS  # noqa: E402
from htmuon.train.loop import read_metrics, train  # noqa: E402
from htmuon.train.optimizers import DEFAULT_ADAMW_LR, HTMUON_NAMES, OPTIMIZERS, build_optimizer, resolve  # noqa: E402

NEW = ["adamuon", "htmuon-adamuon", "mars", "soap", "cadamw", "galore", "cosmos"]


def tiny(corpus_file, out, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_RUN, "data": str(corpus_file), "out_dir": str(out), **kw})


def test_every_paper_baseline_has_a_name():
    assert set(NEW) | {"adamw", "muon", "normuon", "htmuon-normuon"} <= set(OPTIMIZERS)
    assert OPTIMIZERS["adamuon"]["plugin"] == "adamuon" and OPTIMIZERS["adamuon"]["p"] == 0.0
    assert OPTIMIZERS["htmuon-adamuon"]["plugin"] == "adamuon" and OPTIMIZERS["htmuon-adamuon"]["p"] > 0
    assert {"mars", "soap", "cadamw", "galore", "cosmos"}.isdisjoint(HTMUON_NAMES)


@pytest.mark.parametrize("name", NEW)
def test_baseline_trains_and_resumes_exactly(name, corpus_file, tmp_path):
    """12 steps straight vs. stopped after 5 and resumed: the same weights and losses (the optimizer's
    state_dict round-trips through a weights_only checkpoint; SOAP refreshes its basis at step 10)."""
    skip_without_library(name)
    kw = dict(optimizer=name, steps=12, warmup_steps=2, eval_every=6, ckpt_every=4)
    full = train(tiny(corpus_file, tmp_path / "full", **kw))
    assert full["finished"] and math.isfinite(full["final_val_loss"])
    assert train(tiny(corpus_file, tmp_path / "cut", **kw), stop_after=5)["stopped"]
    resumed = train(tiny(corpus_file, tmp_path / "cut", **kw), resume=True)
    a = checkpoint.load(tmp_path / "full" / "ckpt.pt")["model"]
    b = checkpoint.load(tmp_path / "cut" / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["final_val_loss"] == resumed["final_val_loss"]

    def losses(d):
        return [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"]

    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    # the loss went down from its start (the optimizer does optimise)
    assert losses(tmp_path / "full")[-1] < losses(tmp_path / "full")[0]
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["optimizer"] == name and cfg["lr"] == OPTIMIZERS[name]["lr"]


def test_compare_accepts_every_baseline(corpus_file, tmp_path):
    names = [n for n in NEW if baseline_library_error(n) is None]
    grid = ("model", "vocab_size", "seq_len", "batch_size", "eval_batches", "threads", "progress", "alpha")
    tiny_flags = flags({**{k: TINY_RUN[k] for k in grid}, "steps": 2, "warmup_steps": 1, "eval_every": 2})
    out = tmp_path / "grid"
    argv = ["compare", "--optimizers", ",".join(["muon", *names]), "--data", str(corpus_file)]
    assert cli_main([*argv, "--out-dir", str(out), *tiny_flags]) == 0
    md = (out / "results.md").read_text()
    assert all(f"| {n} |" in md for n in names)


def _resnet_cfg(name: str) -> TrainConfig:
    return resolve(TrainConfig(model="resnet-micro", optimizer=name))


def _tiny_lm():
    from htmuon.train.models import build_llama

    return build_llama("llama-micro", 300, 16)


def test_mars_is_configured_to_leave_vectors_to_its_adamw():
    """The flags that make pytorch_optimizer's MARS apply its variance-reduced update to matrices only
    (optimize_1d=False: 1-D parameters take its AdamW at lr_1d); the routing itself is MARS's own."""
    pytest.importorskip("pytorch_optimizer")
    model = _tiny_lm()
    opt = build_optimizer(model, resolve(TrainConfig(model="llama-micro", optimizer="mars")))
    (group,) = opt.param_groups
    assert group["mars_type"] == "adamw" and not group["optimize_1d"] and group["weight_decay_1d"] == 0.0
    assert group["lr_1d"] == DEFAULT_ADAMW_LR and group["gamma"] == 0.025


def test_galore_projects_hidden_2d_weights_only():
    pytest.importorskip("pytorch_optimizer")
    model = _tiny_lm()
    opt = build_optimizer(model, resolve(TrainConfig(model="llama-micro", optimizer="galore")))
    projected = [g for g in opt.param_groups if "rank" in g]
    assert len(projected) == 1
    names = {id(p): n for n, p in model.named_parameters()}
    pnames = [names[id(p)] for p in projected[0]["params"]]
    assert pnames and all(("self_attn" in n or "mlp" in n) and n.endswith("weight") for n in pnames)
    assert projected[0]["rank"] == 32 // 4  # hidden 32 -> rank 8
    model(input_ids=torch.randint(0, 300, (2, 16))).logits.sum().backward()
    opt.step()
    for p in projected[0]["params"]:  # Adam moments in the rank-8 space
        assert min(opt.state[p]["exp_avg"].shape) == 8
    emb = model.model.embed_tokens.weight
    assert opt.state[emb]["exp_avg"].shape == emb.shape
    # the state_dict is tensors and plain values: a weights_only load accepts it, and the projector
    # comes back with the same projection matrix
    first = projected[0]["params"][0]
    before = opt.state[first]["projector"].ortho_matrix.clone()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(opt.state[first]["projector"].ortho_matrix, before)
    assert opt.state[first]["projector"].rank == 8


def test_cosmos_routing_conv_kernels_and_embeddings_to_adamw():
    model = _tiny_lm()
    opt = build_optimizer(model, resolve(TrainConfig(model="llama-micro", optimizer="cosmos")))
    cosmos = [g for g in opt.param_groups if g["algorithm"] == "cosmos"]
    assert len(cosmos) == 1 and all(p.ndim == 2 for p in cosmos[0]["params"])
    in_cosmos = {id(p) for p in cosmos[0]["params"]}
    assert id(model.model.embed_tokens.weight) not in in_cosmos and id(model.lm_head.weight) not in in_cosmos
    adamw_lrs = {g["lr"] for g in opt.param_groups if g["algorithm"] == "adamw"}
    assert adamw_lrs == {DEFAULT_ADAMW_LR}


@pytest.mark.parametrize("name", ["mars", "soap", "cadamw", "galore", "cosmos"])
def test_baselines_train_conv_nets(name):
    skip_without_library(name)
    from htmuon.train.models import build_resnet

    model = build_resnet("resnet-micro", 1, 10)
    opt = build_optimizer(model, _resnet_cfg(name))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):  # SOAP's first step only sets up its preconditioner
        nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.arange(4)).backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_missing_library_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.import_module

    def no_baselines(name, *args):
        if name in ("pytorch_optimizer", "heavyball"):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_baselines)
    for name, package in (
        ("mars", "pytorch-optimizer"),
        ("soap", "pytorch-optimizer"),
        ("cadamw", "heavyball"),
    ):
        with pytest.raises(
            UserError, match=rf"'{name}' needs the {package} package: pip install htmuon\[baselines\]"
        ):
            build_optimizer(nn.Linear(4, 4), _resnet_cfg(name))


def test_a_library_that_fails_to_import_is_named_as_installed_not_missing(monkeypatch):
    """heavyball 3.2 installed beside torch 2.4 fails inside its own import (an ImportError that is not
    its module missing): said as such, with the torch version and the cause, not as 'pip install'."""
    real = importlib.import_module

    def broken(name, *args):
        if name == "heavyball":
            raise ImportError("cannot import name 'DTensor' from 'torch.distributed.tensor'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(UserError) as err:
        build_optimizer(nn.Linear(4, 4), _resnet_cfg("cadamw"))
    msg = str(err.value)
    assert "heavyball package is installed but fails to import" in msg and torch.__version__ in msg
    assert "cannot import name 'DTensor'" in msg and "pip install" not in msg and "\n" not in msg


def test_cautious_adamw_masks_disagreeing_coordinates():
    """heavyball's AdamW(caution=True) against C-AdamW written out: Adam's direction zeroed where its
    sign disagrees with the gradient's, rescaled by (number of entries) / (number kept)."""
    skip_without_library("cadamw")
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 5))
    cfg = resolve(TrainConfig(model="resnet-micro", optimizer="cadamw", weight_decay=0.0))
    opt = build_optimizer(nn.ParameterList([w]), cfg)
    g1, g2 = torch.randn(6, 5), torch.randn(6, 5)
    b1, b2, lr = cfg.adamw_beta1, cfg.adamw_beta2, cfg.lr
    ref = w.detach().double().clone()
    m = torch.zeros_like(ref)
    v = torch.zeros_like(ref)
    for t, g in enumerate((g1, g2), 1):
        w.grad = g.clone()
        opt.step()
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-8)
        keep = (u * g > 0).double()
        ref -= lr * u * keep * (keep.numel() / keep.sum())
    assert torch.allclose(w.detach().double(), ref, rtol=0, atol=1e-6)
    assert (w.detach().double() - ref).abs().max() < 1e-6


# ----------------------------------------------------------------------------- COSMOS


def test_cosmos_full_rank_first_step_is_sign_of_adam_in_the_eigenbasis():
    """rank = n: no Muon part; at step 1 Adam in the eigenbasis U of G^T G gives sign(G U) U^T, so the
    step is -lr sign(G U) U^T (entry RMS exactly lr)."""
    torch.manual_seed(1)
    m, n, lr = 7, 5, 1e-2
    W = nn.Parameter(torch.randn(m, n, dtype=torch.float32))
    W0 = W.detach().clone()
    G = torch.randn(m, n)
    opt = COSMOS([W], lr=lr, rank=n, eps=0.0)
    W.grad = G.clone()
    opt.step()
    _, vecs = torch.linalg.eigh((G.T @ G).double())
    U = vecs.flip(-1)
    expected = -lr * torch.sign(G.double() @ U) @ U.T
    assert torch.allclose((W.detach() - W0).double(), expected, atol=1e-5)


def test_cosmos_step_has_entry_rms_lr_and_decays_weights():
    torch.manual_seed(2)
    m, n, lr, wd = 16, 12, 3e-3, 0.1
    W = nn.Parameter(torch.randn(m, n))
    opt = COSMOS([W], lr=lr, rank=4, weight_decay=wd)
    for _ in range(3):
        W0 = W.detach().clone()
        W.grad = torch.randn(m, n)
        opt.step()
        step = W.detach() - W0 * (1 - lr * wd)
        assert step.norm() / math.sqrt(m * n) == pytest.approx(lr, rel=1e-4)


def test_cosmos_tracks_the_leading_right_subspace():
    """Gradients G_t = X_t diag(s) V^T with a fixed V and a decaying spectrum: the tracked basis
    converges to the top-r right singular vectors."""
    torch.manual_seed(3)
    m, n, r = 40, 20, 3
    V, _ = torch.linalg.qr(torch.randn(n, n))
    s = torch.tensor([10.0, 8.0, 6.0] + [0.5] * (n - 3))
    W = nn.Parameter(torch.zeros(m, n))
    opt = COSMOS([W], lr=1e-3, rank=r)
    for _ in range(30):
        W.grad = torch.randn(m, n) @ torch.diag(s) @ V.T
        opt.step()
    U = opt.state[W]["basis"]
    top = V[:, :r]
    # the sines of the principal angles between span(U) and span(top) are small
    sines = torch.linalg.svdvals(top - U @ (U.T @ top))
    assert sines.max() < 0.2
    assert torch.allclose(U.T @ U, torch.eye(r), atol=1e-5)


def test_cosmos_validates_its_arguments():
    w = [nn.Parameter(torch.zeros(2, 2))]
    for kw, word in (
        (dict(lr=0.0), "learning rate"),
        (dict(rank=0), "rank"),
        (dict(betas=(1.0, 0.9)), "betas"),
    ):
        with pytest.raises(ValueError, match=word):
            COSMOS(w, **kw)
    with pytest.raises(ValueError, match="algorithm"):
        COSMOS([{"params": w, "algorithm": "sgd"}])


def test_cosmos_refuses_invalid_group_values_and_adds_nothing():
    """Group values are checked as the constructor's arguments, in the constructor's groups and in
    add_param_group (a misspelt algorithm trained as AdamW; rank 0 or 2.5 and lr -1 were accepted)."""
    opt = COSMOS([nn.Parameter(torch.zeros(3, 3))], lr=1e-3)
    for group, word in (
        ({"algorithm": "sgd"}, "algorithm: 'sgd' in param group 1"),
        ({"rank": 0}, "rank: 0 in param group 1"),
        ({"rank": 2.5}, "rank: 2.5 in param group 1"),
        ({"lr": -1.0}, "learning rate: -1.0 in param group 1"),
        ({"adamw_betas": (0.9, 1.5)}, "adamw_betas"),
        ({"eps": float("nan")}, "eps: nan"),
    ):
        with pytest.raises(ValueError, match=word):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], **group})
        assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="rank: 0 in param group 0"):
        COSMOS([{"params": [nn.Parameter(torch.zeros(2, 2))], "rank": 0}])
    with pytest.raises(ValueError, match="rank: 2.5"):
        COSMOS([nn.Parameter(torch.zeros(2, 2))], rank=2.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_cosmos_resumes_low_and_high_precision_parameters_exactly(dtype):
    """torch's load_state_dict casts state to the parameter's dtype; COSMOS's matrix state stays float32
    (a bfloat16 or float64 parameter's first resumed step failed on mixed dtypes), its AdamW part's
    state keeps the parameter's dtype, as torch's (a float32 copy fails the resumed AdamW step)."""
    torch.manual_seed(4)
    grads = [(torch.randn(8, 6).to(dtype), torch.randn(6).to(dtype)) for _ in range(4)]
    w, b = nn.Parameter(torch.randn(8, 6).to(dtype)), nn.Parameter(torch.randn(6).to(dtype))
    opt = COSMOS([w, b], lr=1e-3, rank=2, weight_decay=0.1)
    for gw, gb in grads[:2]:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    w2, b2 = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    opt2 = COSMOS([w2, b2], lr=1e-3, rank=2, weight_decay=0.1)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert all(v.dtype == torch.float32 for v in opt2.state[w2].values() if torch.is_tensor(v))
    assert all(v.dtype == dtype for v in opt2.state[b2].values() if torch.is_tensor(v))
    for gw, gb in grads[2:]:
        for p, q, o in ((w, b, opt), (w2, b2, opt2)):
            p.grad, q.grad = gw.clone(), gb.clone()
            o.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_mars_gives_vit_tables_no_weight_decay():
    """A ViT's class token and position table are >= 2-D (MARS-AdamW) but no weights to decay, as for
    every other baseline: a group of their own with weight_decay 0 (they were decayed at 0.1)."""
    pytest.importorskip("pytorch_optimizer")
    from htmuon.train.models import build_vit

    model = build_vit("vit-micro", 3, 10, 8)
    cfg = resolve(TrainConfig(model="vit-micro", optimizer="mars"))
    opt = build_optimizer(model, cfg)
    tables = {"model.vit.embeddings.cls_token", "model.vit.embeddings.position_embeddings"}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert set(decay) == set(names.values())
    assert all(decay[n] == 0.0 for n in tables)
    weights = [n for n, p in model.named_parameters() if p.ndim >= 2 and n not in tables]
    assert weights and all(decay[n] == cfg.weight_decay for n in weights)


def _cosmos_reference(W, grads, lr, rank, betas, gamma, wd, eps=1e-8):
    """COSMOS's docstring written out in float64 (the Newton-Schulz factor: the library's ``polar``)."""
    from htmuon.spectral import polar

    b1, b2 = betas
    W = W.double().clone()
    m, n = W.shape
    M = torch.zeros(m, n, dtype=torch.float64)
    V = torch.zeros(m, rank, dtype=torch.float64)
    U = S = None
    for t, G in enumerate(grads, 1):
        G = G.double()
        M = b1 * M + G
        if t == 1:
            U_new = torch.linalg.eigh(G.T @ G)[1].flip(-1)[:, :rank]  # top-r eigenvectors, largest first
            S = (1 - b2) * (G @ U_new).T @ (G @ U_new)
        else:
            U_new = torch.linalg.qr(b2 * U @ S + (1 - b2) * G.T @ G @ U)[0]
            T = U.T @ U_new
            S = b2 * T.T @ S @ T + (1 - b2) * (G @ U_new).T @ (G @ U_new)
        U = U_new
        V = b2 * V + (1 - b2) * (G @ U) ** 2
        c = (1 - b1**t) / (1 - b1)
        N = (G + b1 * M) / (1 + b1 * c)
        A = ((N @ U) / ((V / (1 - b2**t)).sqrt() + eps)) @ U.T
        B = polar((N @ (torch.eye(n, dtype=torch.float64) - U @ U.T)).float()).double()
        D = A + gamma * math.sqrt(m * n) * B / B.norm()
        W = W * (1 - lr * wd) - lr * math.sqrt(m * n) * D / D.norm()
    return W


def test_cosmos_matches_its_definition_over_several_steps():
    """Four steps with rank < n (both parts), weight decay and non-default betas / gamma against the
    docstring's formulas in float64: the momentum, its Nesterov-like N_t, the eigenbasis start and
    the QR tracking with the rotated S, the bias-corrected second moment, the Muon part on the
    complement weighted by gamma sqrt(mn). Before this test a mutant of any of these trained on."""
    torch.manual_seed(5)
    m, n, r, lr, wd, betas, gamma = 12, 9, 3, 1e-2, 0.1, (0.8, 0.9), 0.3
    grads = [torch.randn(m, n) @ torch.diag(torch.linspace(3.0, 0.5, n)) for _ in range(4)]
    W = nn.Parameter(torch.randn(m, n))
    expected = _cosmos_reference(W.detach(), grads, lr, r, betas, gamma, wd)
    opt = COSMOS([W], lr=lr, rank=r, betas=betas, gamma=gamma, weight_decay=wd)
    for g in grads:
        W.grad = g.clone()
        opt.step()
    # steps have entry RMS lr = 1e-2 each; agreement to 1e-5 per entry: a different formula
    # moves entries by ~lr
    assert (W.detach().double() - expected).abs().max() < 1e-5


def test_cosmos_adamw_part_is_torch_adamw_with_adamw_betas():
    """Vectors, an ``algorithm="adamw"`` group and matrices with more than ``max_rows`` rows take
    AdamW with ``adamw_betas`` (not the COSMOS betas), bias correction and decoupled decay: the same
    steps as torch.optim.AdamW; a matrix with exactly ``max_rows`` rows is still COSMOS's."""
    torch.manual_seed(6)
    vec, tall, own = (
        nn.Parameter(torch.randn(5)),
        nn.Parameter(torch.randn(7, 3)),
        nn.Parameter(torch.randn(3, 3)),
    )
    ref = [nn.Parameter(p.detach().clone()) for p in (vec, tall, own)]
    kw = dict(lr=1e-2, weight_decay=0.1, eps=1e-8)
    opt = COSMOS(
        [{"params": [vec, tall]}, {"params": [own], "algorithm": "adamw"}],
        betas=(0.5, 0.6),
        adamw_betas=(0.8, 0.9),
        max_rows=6,
        **kw,
    )
    torch_opt = torch.optim.AdamW(ref, betas=(0.8, 0.9), **kw)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ref]
        for p, q, g in zip((vec, tall, own), ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip((vec, tall, own), ref):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
        assert "basis" not in opt.state[p]
    edge = nn.Parameter(torch.randn(6, 3))
    opt = COSMOS([edge], lr=1e-2, rank=2, max_rows=6)
    edge.grad = torch.randn(6, 3)
    opt.step()
    assert opt.state[edge]["basis"].shape == (3, 2)


def test_baselines_run_with_the_documented_hyperparameters():
    """The betas, eps, schedules and weight-decay split that docs/harness.md says each baseline ran
    with (a swapped beta pair or a decayed norm gain trained on unnoticed)."""
    pytest.importorskip("pytorch_optimizer")
    model = _tiny_lm()
    matrices = {id(p) for p in model.parameters() if p.ndim >= 2}

    def build(name, **kw):
        cfg = TrainConfig(model="llama-micro", optimizer=name, weight_decay=0.1, **kw)
        return build_optimizer(model, resolve(cfg))

    def decay_only_on_matrices(opt, wd_key="weight_decay"):
        seen = [(id(p), g[wd_key]) for g in opt.param_groups for p in g["params"]]
        assert len(seen) == len(list(model.parameters()))
        assert all(wd == (0.1 if pid in matrices else 0.0) for pid, wd in seen)

    adamw = build("adamw")
    assert isinstance(adamw, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in adamw.param_groups)
    decay_only_on_matrices(adamw)
    (mars,) = build("mars").param_groups
    assert mars["betas"] == (0.95, 0.99) and mars["betas_1d"] == (0.9, 0.95)
    soap = build("soap")
    assert all(
        g["betas"] == (0.95, 0.95)
        and g["precondition_frequency"] == 10
        and g["max_precondition_dim"] == 10000
        for g in soap.param_groups
    )
    decay_only_on_matrices(soap)
    galore = build("galore")
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-6 for g in galore.param_groups)
    (proj,) = [g for g in galore.param_groups if "rank" in g]
    assert proj["update_proj_gap"] == 200 and proj["scale"] == 0.25 and proj["projection_type"] == "std"
    decay_only_on_matrices(galore)
    cosmos = build("cosmos")
    assert all(
        g["betas"] == (0.9, 0.95)
        and g["adamw_betas"] == (0.9, 0.95)
        and g["rank"] == 64
        and g["gamma"] == 0.2
        for g in cosmos.param_groups
    )
    decay_only_on_matrices(cosmos)
    # --adamw-beta1/2 reach MARS's vectors and both parts of COSMOS
    (mars,) = build("mars", adamw_beta1=0.8, adamw_beta2=0.99).param_groups
    assert mars["betas_1d"] == (0.8, 0.99) and mars["betas"] == (0.95, 0.99)
    cosmos = build("cosmos", adamw_beta1=0.8, adamw_beta2=0.99)
    assert all(g["betas"] == g["adamw_betas"] == (0.8, 0.99) for g in cosmos.param_groups)
