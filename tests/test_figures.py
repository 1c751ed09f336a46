"""htmuon.train.figures: update spectra (Muon-SVD flat, Muon-NS not, HTMuon s^p), layer norms,
the interval-overhead timing, and the PNGs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from helpers import TINY_RUN  # noqa: E402
from htmuon import HTMuon  # noqa: E402
from htmuon.train.figures import UpdateRecorder, interval_overhead, layer_norms, main  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _one_step(**kw) -> torch.Tensor:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 16, dtype=torch.float64))
    G = torch.randn(24, 16, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 16, dtype=torch.float64))
    opt = HTMuon([w], lr=0.05, weight_decay=0.1, **kw)
    rec = UpdateRecorder(opt, [("w", w)], steps=[1])
    w.grad = G.clone()
    rec.before(1)
    opt.step()
    rec.after(1)
    return rec.spectra[1]["w"], G


def test_muon_svd_update_is_exactly_flat_and_ns_is_not():
    s, _ = _one_step(p=0.0, method="svd")
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-4)  # decay taken out; the SVD is float32
    s_ns, _ = _one_step(p=0.0, method="ns")
    assert (s_ns.max() - s_ns.min()) / s_ns.max() > 0.05


def test_htmuon_update_spectrum_is_s_to_the_p():
    s, G = _one_step(p=0.5, method="svd")
    beta = 0.95
    N = (1 - beta) * G + beta * (1 - beta) * G  # Nesterov momentum after one step
    expected = torch.linalg.svdvals(N).pow(0.5) * (24 / 16) ** 0.5  # Muon's shape scale
    assert torch.allclose(s, expected, rtol=1e-4)  # a float32 SVD


def test_layer_norms_are_the_matrix_norms():
    from htmuon.train.models import build_llama

    model = build_llama("llama-micro", 300, 16)
    rows = layer_norms(model)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().double()
    first = rows[0]
    assert first["name"].endswith("layers.0.self_attn.q_proj.weight")
    assert first["spectral"] == pytest.approx(float(torch.linalg.svdvals(q)[0]), rel=1e-9)
    assert first["frobenius"] == pytest.approx(float(q.pow(2).sum().sqrt()), rel=1e-9)
    assert all("embed" not in r["name"] and "lm_head" not in r["name"] for r in rows)


def test_interval_overhead_times_every_configuration():
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    times = interval_overhead(model, intervals=(1, 5), steps=5, repeats=1)
    assert set(times) == {"muon", "htmuon-svd k=1", "htmuon-svd k=5", "htmuon-ns k=1", "htmuon-ns k=5"}
    assert all(t > 0 for t in times.values())


def test_figures_command_writes_pngs(corpus_file, tmp_path):
    keys = ("vocab_size", "seq_len", "batch_size", "threads", "progress", "alpha")
    sets = [f"{k}={str(TINY_RUN[k]).lower()}" for k in keys]
    argv = ["--out", str(tmp_path), "--model", "llama-micro", "--data", str(corpus_file), "--steps", "3"]
    argv += [
        "--record",
        "1,3",
        "--layers",
        "2",
        "--optimizer",
        "muon",
        "--optimizer",
        "htmuon:p=0,method=svd",
    ]
    assert main([*argv, "--no-overhead", "--set", *sets]) == 0
    for name in ("update_spectra_muon.png", "update_spectra_htmuon__p=0_method=svd.png", "layer_norms.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    res = json.loads((tmp_path / "figures.json").read_text())
    flat = res["spectra"]["htmuon:p=0,method=svd"]["3"]
    for values in flat.values():
        nonzero = [v for v in values if v > 1e-3 * values[0]]
        assert max(nonzero) / min(nonzero) < 1 + 1e-4  # Muon-SVD: flat (float32 weights)
    # Muon's NS5 is not the exact polar factor: its quintic leaves the singular values in ~[0.7, 1.2]
    ns5 = res["spectra"]["muon"]["3"]
    assert ns5.keys() == flat.keys()
    ratios = {k: max(v) / min(u for u in v if u > 1e-3 * max(v)) for k, v in ns5.items()}
    assert all(r > 1.05 for r in ratios.values()), ratios
    assert main(["--out", str(tmp_path), "--set", "nokey"]) == 2


def test_figures_command_refuses_record_steps_it_would_not_reach(tmp_path, capsys):
    """--record steps outside 1..--steps were dropped silently (the default 1,50,100 with --steps 6
    recorded step 1 only); a non-number was a traceback. Both are one-line errors, before training."""
    for record, msg in (("1,50", "--record steps must lie in 1..--steps (6), got '1,50' (lower them"),
                        ("a", "--record takes comma-separated step numbers, got 'a'")):  # fmt: skip
        assert main(["--out", str(tmp_path / "f"), "--steps", "6", "--record", record]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_figures_command_refuses_what_it_would_override_or_find_too_late(tmp_path, capsys, monkeypatch):
    """``--set steps=3`` under ``--steps 6 --record 6`` passed the --record check and crashed with an
    IndexError after training (no step 6 recorded); a budget (tokens_per_param) or a spec's own steps
    did the same; ``--set model=...`` silently beat --model; the overhead figure's refusal of an image
    model came after every optimizer had trained. All are one-line errors before any training."""
    import htmuon.train.figures as figures

    trained = []
    monkeypatch.setattr(figures, "train_and_record", lambda *a, **k: trained.append(a) or ({}, []))
    base = ["--out", str(tmp_path / "f"), "--model", "llama-micro", "--steps", "6", "--record", "6"]
    for extra, msg in (
        (["--no-overhead", "--set", "steps=3"], "--set steps=3: steps has its own flag, --steps"),
        (["--no-overhead", "--set", "model=llama-tiny"], "--set model=llama-tiny: model has its own flag"),
        (["--no-overhead", "--optimizer", "muon", "--optimizer", "htmuon:steps=3"],
         "--record steps must lie in 1..3, the steps htmuon:steps=3 trains, got '6'"),
        (["--no-overhead", "--set", "tokens_per_param=0.0001"], "--record steps must lie in 1..1"),
        (["--model", "resnet-micro", "--optimizer", "muon"],
         "('resnet-micro' is an image model): pass --no-overhead"),
    ):  # fmt: skip
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert trained == []


@pytest.mark.parametrize("wd_mode", ["lr", "independent"])
def test_figures_train_as_the_loop_trains(wd_mode, corpus_file, tmp_path):
    """The figures' training is the loop's (schedule, clipping, weight decay): the final weights'
    norms match a ``htmuon train`` run of the same config (``wd_mode`` "independent" was ignored)."""
    from htmuon.train import checkpoint
    from htmuon.train.config import TrainConfig
    from htmuon.train.figures import train_and_record
    from htmuon.train.loop import build_data_and_model, train

    kw = {**TINY_RUN, "data": str(corpus_file), "optimizer": "muon", "steps": 4, "grad_clip": 0.5}
    cfg = TrainConfig(**kw, weight_decay=0.5, wd_mode=wd_mode, out_dir=str(tmp_path / "run"))
    _, norms = train_and_record(cfg, [1], layers=1)
    train(cfg)
    _, model, _ = build_data_and_model(cfg)
    model.load_state_dict(checkpoint.load(tmp_path / "run" / "ckpt.pt")["model"])
    want = layer_norms(model)
    assert [r["name"] for r in norms] == [r["name"] for r in want]
    for got, ref in zip(norms, want):
        assert got["frobenius"] == pytest.approx(ref["frobenius"], rel=1e-5)
        assert got["spectral"] == pytest.approx(ref["spectral"], rel=1e-5)


def test_figures_command_says_the_steps_a_budget_trains(tmp_path, capsys, monkeypatch):
    """With ``--set tokens_per_param=...`` the line "training SPEC for N steps" gave --steps (6), not
    the budget's steps that ran (2): it gives the resolved steps."""
    import htmuon.train.figures as figures
    from htmuon.train.config import make_config
    from htmuon.train.loop import budget_steps

    trained = []
    monkeypatch.setattr(figures, "train_and_record", lambda cfg, *a, **k: trained.append(cfg) or ({}, []))
    monkeypatch.setattr(figures, "plot_spectra", lambda *a, **k: None)
    monkeypatch.setattr(figures, "plot_layer_norms", lambda *a, **k: None)
    sets = ["tokens_per_param=0.001", "vocab_size=320", "seq_len=16", "batch_size=2"]
    argv = ["--out", str(tmp_path), "--model", "llama-micro", "--steps", "6", "--record", "1"]
    assert main([*argv, "--no-overhead", "--optimizer", "muon", "--set", *sets]) == 0
    want = budget_steps(make_config(overrides=dict(model="llama-micro", vocab_size=320, seq_len=16,
                                                   batch_size=2, tokens_per_param=0.001)))  # fmt: skip
    assert want != 6 and len(trained) == 1
    assert f"training muon for {want} steps ..." in capsys.readouterr().err


def test_figures_default_warmup_gives_way_to_a_given_one(tmp_path, monkeypatch):
    """The command's own warmup (10% of --steps as a step count) is a default, not the user's: ``--set
    warmup_fraction=...`` is not refused as both warmup keys given together, and a spec's warmup wins."""
    import htmuon.train.figures as figures

    trained = {}
    monkeypatch.setattr(
        figures, "train_and_record", lambda cfg, *a, **k: trained.update({cfg.optimizer: cfg}) or ({}, [])
    )
    monkeypatch.setattr(figures, "plot_spectra", lambda *a, **k: None)
    monkeypatch.setattr(figures, "plot_layer_norms", lambda *a, **k: None)
    argv = [
        "--out",
        str(tmp_path),
        "--model",
        "llama-micro",
        "--steps",
        "20",
        "--record",
        "1",
        "--no-overhead",
    ]
    argv += ["--optimizer", "muon", "--optimizer", "htmuon:warmup_steps=3", "--set", "warmup_fraction=0.5"]
    assert main(argv) == 0
    assert (trained["muon"].warmup_fraction, trained["htmuon"].warmup_fraction) == (0.5, None)
    assert trained["htmuon"].warmup_steps == 3
