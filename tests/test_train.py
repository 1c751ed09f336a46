"""The training harness: corpus, split, tokenizer, loop, checkpoints, exact resume, bad input."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import TINY_RUN, flags, skip_without_library  # noqa: E402
from htmuon.cli import UserError  # noqa: E402
from htmuon.cli import main as cli_main  # noqa: E402
from htmuon.train import checkpoint  # noqa: E402
from htmuon.train.config import TrainConfig, make_config  # noqa: E402
from htmuon.train.data import (  # noqa: E402
    BlockSampler,
    builtin_corpus_path,
    chunk_document,
    load_image_data,
    text_splits,
)
from htmuon.train.loop import lr_factor, read_metrics, train  # noqa: E402
from htmuon.train.optimizers import OPTIMIZERS  # noqa: E402
from htmuon.train.tokenizer import prepare_tokens, train_tokenizer  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def tiny(corpus_file: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_RUN, "data": str(corpus_file), "out_dir": str(out), **kw})


# ----------------------------------------------------------------------------- corpus and data


def test_builtin_corpus_is_real_clean_text_with_attribution():
    path = builtin_corpus_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    assert len(text.encode()) > 1_000_000
    assert "HAMLET" in text and "To be, or not to be" in text
    low = text.lower()
    for licence_word in ("project gutenberg", "small print", "copyright"):
        assert licence_word not in low
    attribution = (path.parent / "ATTRIBUTION.md").read_text()
    assert "public domain" in attribution and "Gutenberg" in attribution


def test_split_is_deterministic_disjoint_and_sized():
    a = text_splits("shakespeare", 0.05)
    b = text_splits("shakespeare", 0.05)
    assert a.train == b.train and a.val == b.val
    tr = sum(len(c) for d in a.train for c in d)
    va = sum(len(c) for d in a.val for c in d)
    assert 0.03 < va / (tr + va) < 0.07
    val_chunks = {c for d in a.val for c in d}
    assert not val_chunks & {c for d in a.train for c in d}


def test_chunking_keeps_text_and_splits_every_kth(tmp_path):
    doc = "".join(f"line {i}\n" for i in range(5000))
    chunks = chunk_document(doc, 100)
    assert "".join(chunks) == doc and all(c.endswith("\n") for c in chunks)
    (tmp_path / "doc.txt").write_text(doc)
    val = text_splits(str(tmp_path / "doc.txt"), 0.25).val
    assert len(val[0]) == len(chunk_document(doc)) // 4


def test_block_sampler_resumes_and_covers_each_epoch():
    s = BlockSampler(10, 3, seed=7)
    first = [s.next_indices() for _ in range(3)]
    state = s.state_dict()
    rest = [s.next_indices() for _ in range(4)]
    s2 = BlockSampler(10, 3, seed=7)
    s2.load_state_dict(state)
    assert all((x == y).all() for x, y in zip(rest, [s2.next_indices() for _ in range(4)]))
    epoch0 = np.concatenate(first + rest)[:10]
    assert sorted(epoch0.tolist()) == list(range(10))


def test_tokenizer_training_is_deterministic_and_cached(corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "cache"))
    splits = text_splits(str(corpus_file), 0.1)
    t1 = train_tokenizer(splits.train, 400)
    t2 = train_tokenizer(splits.train, 400)
    assert t1.to_str() == t2.to_str() and t1.get_vocab_size() == 400
    tok, tr, va, d = prepare_tokens(splits, 400)
    assert tok.to_str() == t1.to_str()
    assert tok.decode(tr[:50].tolist()) == "".join(splits.train[0])[: len(tok.decode(tr[:50].tolist()))]
    assert sorted(p.name for p in d.iterdir()) == ["tokenizer.json", "train.npy", "val.npy"]  # no temp files
    tok2, tr2, va2, d2 = prepare_tokens(splits, 400)  # a cache hit
    assert d2 == d and (tr2 == tr).all() and (va2 == va).all()
    _, _, _, d3 = prepare_tokens(splits, 500)
    assert d3 != d


def test_user_text_sources(tmp_path):
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"document {i} " * 50}) for i in range(40)) + "\n")
    s = text_splits(str(jl), 0.1)
    assert len(s.train) + len(s.val) == 40 and len(s.val) == 4
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"text number {i}\n" * 2000)
    s = text_splits(str(folder), 0.1)
    assert len(s.val) >= 1
    with pytest.raises(UserError, match="field 'body'"):
        text_splits(str(jl), 0.1, text_field="body")
    # a folder's .txt.gz and .jsonl files too, as the training loop streams them (text_splits read only
    # its .txt files); every document once, in the files' order
    (folder / "3.txt.gz").write_bytes(gzip.compress(b"gzipped text\n" * 2000))
    (folder / "4.jsonl").write_text(json.dumps({"text": "a jsonl document " * 300}) + "\n")
    s = text_splits(str(folder), 0.1)
    text = "".join("".join(chunks) for chunks in [*s.train, *s.val])
    for marker, times in (("text number 2", 2000), ("gzipped text", 2000), ("a jsonl document", 300)):
        assert text.count(marker) == times, marker


def test_image_data_digits_and_cifar_pickles(tmp_path):
    d = load_image_data("digits", 32, seed=0)
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    assert len(d.x_train) + len(d.x_val) == 1797
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(range(4))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    c = load_image_data(f"cifar10:{tmp_path}", 8, seed=0)
    assert c.x_train.shape == (20, 3, 32, 32) and c.x_val.shape == (4, 3, 32, 32)
    with pytest.raises(UserError, match="cifar100 folder"):
        load_image_data(f"cifar100:{tmp_path / 'nope'}", 8, seed=0)


def test_lr_schedule_warmup_then_cosine_to_min():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(1, 101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)


# ----------------------------------------------------------------------------- training runs


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_tiny_end_to_end_run_each_optimizer(optimizer, corpus_file, tmp_path):
    skip_without_library(optimizer)  # missing, or a release that needs a newer torch
    out = tmp_path / "run"
    s = train(tiny(corpus_file, out, optimizer=optimizer))
    assert s["finished"] and s["steps_done"] == 6 and math.isfinite(s["final_val_loss"])
    assert s["final_val_ppl"] == pytest.approx(math.exp(s["final_val_loss"]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optimizer"] == optimizer and cfg["lr"] == OPTIMIZERS[optimizer]["lr"]
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and run["versions"]["torch"] == torch.__version__
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 7))
    assert [r["step"] for r in recs if r["kind"] == "val"] == [3, 6]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,kind,loss")
    ck = checkpoint.load(out / "ckpt.pt")
    assert ck["step"] == 6 and ck["config"]["optimizer"] == optimizer and ck["versions"]["torch"]


def test_resnet_on_digits_with_htmuon(tmp_path):
    cfg = TrainConfig(
        model="resnet-micro",
        optimizer="htmuon",
        steps=4,
        warmup_steps=1,
        batch_size=16,
        eval_every=4,
        eval_batches=2,
        threads=1,
        progress="none",
        alpha=False,
        out_dir=str(tmp_path / "r"),
    )
    s = train(cfg)
    assert s["finished"] and s["data"] == "digits" and 0.0 <= s["final_val_acc"] <= 1.0


def _params(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "ckpt.pt")["model"]


@pytest.mark.parametrize("optimizer", ["adamw", "htmuon", "htmuon-interval"])
def test_exact_resume_after_interruption(optimizer, corpus_file, tmp_path):
    kw = dict(
        optimizer=optimizer, steps=9, ckpt_every=2, interval=3 if optimizer == "htmuon-interval" else None
    )
    full = train(tiny(corpus_file, tmp_path / "full", **kw))
    # "killed" after step 5: the checkpoint holds step 5; metrics after it must go on resume
    stopped = train(tiny(corpus_file, tmp_path / "cut", **kw), stop_after=5)
    assert stopped["stopped"] and not (tmp_path / "cut" / "summary.json").exists()
    (tmp_path / "cut" / ".ckpt.pt.tmp999").write_bytes(b"torn write of a killed run")
    resumed = train(tiny(corpus_file, tmp_path / "cut", **kw), resume=True)
    assert resumed["finished"]
    assert not (tmp_path / "cut" / ".ckpt.pt.tmp999").exists()  # a killed write's temp file is removed
    a, b = _params(tmp_path / "full"), _params(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(d):
        return [(r["step"], r["kind"], r["loss"]) for r in read_metrics(d / "metrics.jsonl")]

    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    assert full["final_val_loss"] == resumed["final_val_loss"]
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["resumed_from_steps"] == [5]


def _signal_at_step(monkeypatch, at: int, *signals: int) -> None:
    """Send this process ``signals`` as step ``at`` begins (from the lr schedule, which the loop calls
    first in every step), as a scheduler or Ctrl-C would while the step runs."""
    from htmuon.train import loop

    real = loop.lr_factor

    def schedule(step, *a):
        if step == at:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real(step, *a)

    monkeypatch.setattr(loop, "lr_factor", schedule)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(
    corpus_file, tmp_path, monkeypatch
):
    import signal

    kw = dict(optimizer="htmuon", steps=7, ckpt_every=0)  # no periodic checkpoint before the end
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    full = train(tiny(corpus_file, tmp_path / "full", **kw))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # put back
    _signal_at_step(monkeypatch, 4, signal.SIGTERM)
    cut = train(tiny(corpus_file, tmp_path / "cut", **kw))
    monkeypatch.undo()
    # the step that was running finished, its checkpoint was written, and the run returned stopped
    assert cut["stopped"] and not cut["finished"] and cut["signal"] == "SIGTERM" and cut["steps_done"] == 4
    assert checkpoint.load(tmp_path / "cut" / "ckpt.pt")["step"] == 4
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    resumed = train(tiny(corpus_file, tmp_path / "cut", **kw), resume=True)
    assert resumed["finished"] and "signal" not in resumed
    a, b = _params(tmp_path / "full"), _params(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["final_val_loss"] == resumed["final_val_loss"]


def test_a_second_signal_stops_at_once(corpus_file, tmp_path, monkeypatch):
    import signal

    # Python's own SIGINT handler to begin with, however pytest was started: a background job of a
    # non-interactive shell starts with SIGINT ignored, which a run rightly leaves ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _signal_at_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # Python's own handler, restored by the first signal
            train(tiny(corpus_file, tmp_path / "r", steps=6, ckpt_every=0))
        assert not (tmp_path / "r" / "ckpt.pt").exists()  # no checkpoint: it did not wait for the step
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_under_torchrun_a_repeated_signal_is_ignored(capfd):
    """A launcher passes on signals its workers had already (torchrun forwards Ctrl-C's SIGINT, srun
    signals every process): a rank must not take the repeat as "stop at once"."""
    import signal

    from htmuon.train.loop import StopOnSignal

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopOnSignal(alone=False) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGTERM
        assert seen == []  # no repeat reached the handler from before
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # which is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capfd.readouterr().err
    assert err.count("htmuon: SIGTERM: stopping after this step, with a checkpoint (every rank;") == 1


def test_a_signal_during_the_last_step_lets_the_run_finish(corpus_file, tmp_path, monkeypatch):
    import signal

    _signal_at_step(monkeypatch, 6, signal.SIGTERM)
    s = train(tiny(corpus_file, tmp_path / "r", steps=6))
    assert s["finished"] and not s["stopped"] and s["signal"] == "SIGTERM"
    saved = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert saved["finished"] and "signal" not in saved  # a later call that reuses it was not signalled


def test_a_signal_during_an_evaluation_stops_after_that_step(corpus_file, tmp_path, monkeypatch):
    import signal

    from htmuon.train import loop

    real = loop.evaluate

    def evaluate(*a, **k):  # TINY_RUN evaluates at step 3: the signal comes after the step's vote
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    s = train(tiny(corpus_file, tmp_path / "r", ckpt_every=0))
    assert s["stopped"] and s["steps_done"] == 3 and s["signal"] == "SIGTERM"
    assert checkpoint.load(tmp_path / "r" / "ckpt.pt")["step"] == 3


def test_a_signal_during_a_periodic_checkpoint_stops_with_that_checkpoint(corpus_file, tmp_path, monkeypatch):
    """The wait is the rest of the step plus one checkpoint write: a signal that lands while the
    periodic checkpoint of step 3 is written stops the run there (it used to train step 4 and write
    another checkpoint first)."""
    import signal

    real = checkpoint.save

    def save(path, payload):
        if payload["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, payload)

    monkeypatch.setattr(checkpoint, "save", save)
    s = train(tiny(corpus_file, tmp_path / "r", steps=7))
    monkeypatch.undo()
    assert s["stopped"] and s["steps_done"] == 3 and s["signal"] == "SIGTERM"
    assert checkpoint.load(tmp_path / "r" / "ckpt.pt")["step"] == 3
    assert max(r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")) == 3
    full = train(tiny(corpus_file, tmp_path / "full", steps=7))
    resumed = train(tiny(corpus_file, tmp_path / "r", steps=7), resume=True)
    assert resumed["final_val_loss"] == full["final_val_loss"]


def test_an_ignored_signal_stays_ignored(corpus_file, tmp_path, monkeypatch):
    """SIGINT is ignored in a background job of a non-interactive shell (`cmd &` in a script)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _signal_at_step(monkeypatch, 2, signal.SIGINT)
        s = train(tiny(corpus_file, tmp_path / "r"))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert s["finished"] and "signal" not in s


def test_resume_at_or_past_stop_after_trains_nothing(corpus_file, tmp_path):
    out = tmp_path / "r"
    train(tiny(corpus_file, out, ckpt_every=0), stop_after=4)
    records = (out / "metrics.jsonl").read_text()
    s = train(tiny(corpus_file, out, ckpt_every=0), resume=True, stop_after=2)
    assert s["stopped"] and s["steps_done"] == 4
    assert checkpoint.load(out / "ckpt.pt")["step"] == 4 and (out / "metrics.jsonl").read_text() == records


def test_train_cli_stopped_by_sigterm_exits_143_and_says_how_to_resume(
    corpus_file, tmp_path, monkeypatch, capsys
):
    import signal

    out = tmp_path / "r"
    argv = ["train", *flags({**TINY_RUN, "data": corpus_file, "out_dir": out, "ckpt_every": 0})]
    _signal_at_step(monkeypatch, 2, signal.SIGTERM)
    assert cli_main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = "htmuon train: stopped by SIGTERM after step 2, with a checkpoint; continue with --resume"
    assert err == f"{expected} --out-dir {out}"
    monkeypatch.undo()
    assert cli_main([*argv, "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())["resumed_from_steps"] == [2]


def test_train_cli_takes_the_presets_lrs_and_one_step_prints_its_summary(corpus_file, tmp_path, capsys):
    """`htmuon train --preset` runs the preset's matrix and AdamW-part lrs (the smoke preset carries the
    quick ones); a 1-step run, whose time per step is not measured, still prints its summary line."""
    out = tmp_path / "p"
    argv = ["train", "--preset", "smoke", "--optimizer", "muon", "--data", str(corpus_file), "--steps", "1"]
    argv += ["--warmup-steps", "0", "--vocab-size", "320", "--eval-batches", "1", "--out-dir", str(out)]
    assert cli_main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["lr"], cfg["adamw_lr"]) == (0.01, 0.111)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done: muon lr 0.01 seed 0: val loss ") and "ms/step" not in last


def test_resume_keeps_todays_chunk_budget_not_the_checkpoints(corpus_file, tmp_path, monkeypatch):
    """A checkpoint written before chunk_bytes became "auto" holds 32 MiB; the resumed run steps with
    the library's budget ("auto"), since no config key sets it."""
    from htmuon import HTMuon

    cfg = TrainConfig(**{**TINY_RUN, "data": str(corpus_file), "out_dir": str(tmp_path / "r")})
    train(cfg, stop_after=3)
    path = tmp_path / "r" / "ckpt.pt"
    payload = checkpoint.load(path)
    for g in payload["optimizer"]["param_groups"]:
        g["chunk_bytes"] = 32 * 2**20
    checkpoint.save(path, payload)
    seen = []
    real = HTMuon.step

    def step(self, *a, **kw):
        seen.append([g["chunk_bytes"] for g in self.param_groups])
        return real(self, *a, **kw)

    monkeypatch.setattr(HTMuon, "step", step)
    assert train(cfg, resume=True)["finished"]
    assert seen and all(c == "auto" for groups in seen for c in groups), seen[:1]


def test_a_run_resumed_where_auto_resolves_otherwise_records_and_names_the_switch(
    corpus_file, tmp_path, monkeypatch, capsys
):
    """A run stopped on one machine and resumed on another kind (a study built up over sessions):
    "auto" may resolve to another working dtype there. The run goes on, but not silently: a warning,
    run.json's "backends" records from which step each backend ran, and the summary names both."""
    import htmuon.train.loop as loop

    kw = dict(optimizer="muon", steps=6, ckpt_every=3)
    for name, second in (("same", "ns (NS5 polar), bf16"), ("switched", "ns (NS5 polar), fp32")):
        monkeypatch.setattr(loop, "backend_label", lambda cfg, device: "ns (NS5 polar), bf16")
        train(tiny(corpus_file, tmp_path / name, **kw), stop_after=3)
        capsys.readouterr()
        monkeypatch.setattr(loop, "backend_label", lambda cfg, device, second=second: second)
        s = train(tiny(corpus_file, tmp_path / name, **kw), resume=True)
        err = capsys.readouterr().err
        backends = json.loads((tmp_path / name / "run.json").read_text())["backends"]
        if name == "same":
            assert "warning" not in err and backends == [[0, "ns (NS5 polar), bf16"]]
            assert s["backend"] == "ns (NS5 polar), bf16"
        else:
            assert (
                f"htmuon: warning: '{tmp_path / name}' ran up to step 3 on backend 'ns (NS5 polar), bf16', "
                "which resolves to 'ns (NS5 polar), fp32' on this machine" in err
            )
            assert backends == [[0, "ns (NS5 polar), bf16"], [3, "ns (NS5 polar), fp32"]]
            assert s["backend"] == "ns (NS5 polar), bf16; ns (NS5 polar), fp32 from step 3"
            summary = json.loads((tmp_path / name / "summary.json").read_text())
            assert summary["backend"] == s["backend"]

    # resumed on B, killed before B's first checkpoint, resumed on A: B's record goes with its steps
    out = tmp_path / "back"
    monkeypatch.setattr(loop, "backend_label", lambda cfg, device: "ns (NS5 polar), bf16")
    train(tiny(corpus_file, out, **kw), stop_after=3)
    run_json = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(
        json.dumps({**run_json, "backends": [[0, "ns (NS5 polar), bf16"], [3, "x"]]})
    )
    s = train(tiny(corpus_file, out, **kw), resume=True)
    assert json.loads((out / "run.json").read_text())["backends"] == [[0, "ns (NS5 polar), bf16"]]
    assert s["backend"] == "ns (NS5 polar), bf16" and "warning" not in capsys.readouterr().err


def test_a_run_resumed_where_autocast_resolves_otherwise_says_so(corpus_file, tmp_path, capsys):
    """--dtype auto is bf16 autocast on a bf16 GPU, fp32 elsewhere: a run resumed on other hardware
    changed its arithmetic silently."""
    out = tmp_path / "r"
    train(tiny(corpus_file, out), stop_after=3)
    run = json.loads((out / "run.json").read_text())
    assert run["amp"] is None
    run["amp"] = "torch.bfloat16"  # as if it had started on a bf16 GPU
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert train(tiny(corpus_file, out), resume=True)["finished"]
    err = capsys.readouterr().err
    assert "ran up to step 3 with autocast torch.bfloat16, which is off (fp32) on this device (cpu)" in err
    run = json.loads((out / "run.json").read_text())
    assert run["amp"] is None and run["amp_from_step"] == [[3, None]]


def test_backend_history_label_names_each_backend_and_a_start_not_recorded():
    from htmuon.train.loop import backend_history_label

    assert backend_history_label([[0, "fast, bf16"]]) == "fast, bf16"
    assert (
        backend_history_label([[0, "fast, bf16"], [40, "fast, fp32"]])
        == "fast, bf16; fast, fp32 from step 40"
    )
    # a run made before backends were recorded, resumed at step 1200: its first steps are not claimed
    assert backend_history_label([[1200, "ns, fp32"]]) == "not recorded; ns, fp32 from step 1200"
    assert backend_history_label([[0, None]]) is None and backend_history_label([]) is None  # AdamW


def test_a_run_that_diverged_after_its_checkpoint_is_not_trained_again(
    corpus_file, tmp_path, monkeypatch, capsys
):
    """Resuming (compare re-run, --resume) a diverged run reuses its summary: going back to its last
    checkpoint would re-run the same steps to the same divergence (it used to, every time)."""
    import htmuon.train.loop as loop

    real, calls = loop._loss, []

    def nan_from_step_5(model, task, x, y):
        loss, logits = real(model, task, x, y)
        if model.training:
            calls.append(1)
            if len(calls) >= 5:
                loss = loss * float("nan")
        return loss, logits

    monkeypatch.setattr(loop, "_loss", nan_from_step_5)
    out = tmp_path / "d"
    first = train(tiny(corpus_file, out, optimizer="muon", steps=6, ckpt_every=3))
    assert first["diverged"] and first["steps_done"] == 5 and first["diverged_why"] == "loss nan"
    calls.clear()
    capsys.readouterr()
    again = train(tiny(corpus_file, out, optimizer="muon", steps=6, ckpt_every=3), resume=True)
    assert calls == [] and again["diverged"] and again["steps_done"] == 5
    assert again["run_dir"] == first["run_dir"] and again["elapsed_s"] == first["elapsed_s"]
    err = capsys.readouterr().err
    assert f"'{out}' holds a run that diverged at step 5 (summary.json): reusing its summary" in err
    assert "not running steps 4-5 again" in err


def test_divergence_names_what_was_not_finite(corpus_file, tmp_path, monkeypatch, capsys):
    """A finite loss with a non-finite gradient norm stops the run too, and the message says which
    (it used to say "non-finite loss" beside a finite one)."""
    import torch

    import htmuon.train.loop as loop

    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(loop.torch.nn.utils, "clip_grad_norm_", lambda *a, **k: real(*a, **k) * float("inf"))
    s = train(tiny(corpus_file, tmp_path / "g", optimizer="adamw", steps=4))
    assert s["diverged"] and s["steps_done"] == 1
    assert s["diverged_why"].startswith("non-finite gradient norm inf at loss ")
    assert "training diverged at step 1 (non-finite gradient norm inf at loss" in capsys.readouterr().err


def test_train_resume_of_a_finished_run_says_it_trains_nothing(corpus_file, tmp_path, capsys):
    out = tmp_path / "r"
    rc = cli_main(["train", *flags({**TINY_RUN, "data": corpus_file, "out_dir": out})])
    assert rc == 0
    before = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert cli_main(["train", "--resume", *flags({**TINY_RUN, "data": corpus_file, "out_dir": out})]) == 0
    err = capsys.readouterr().err
    assert (
        err == f"htmuon: '{out}' holds a finished run (step 6 of 6): reusing its summary, nothing to train\n"
    )
    assert (out / "ckpt.pt").read_bytes() == before


def test_resume_without_checkpoints_says_it_starts_over(corpus_file, tmp_path, capsys):
    """A run whose checkpoints are gone (deleted for disk space) but that logged steps starts over on
    --resume, and says so (it restarted silently, discarding the logged steps)."""
    out = tmp_path / "r"
    train(tiny(corpus_file, out, steps=6, ckpt_every=2), stop_after=4)
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        (out / name).unlink(missing_ok=True)
    capsys.readouterr()
    s = train(tiny(corpus_file, out, steps=6, ckpt_every=2), resume=True)
    assert s["finished"] and s["steps_done"] == 6
    err = capsys.readouterr().err
    assert f"'{out}' has no checkpoint (ckpt.pt, ckpt.prev.pt) although its run logged 4 step(s)" in err


def test_stop_on_an_unlogged_step_reports_that_step(corpus_file, tmp_path):
    """steps_done is the loop's count, not the last logged step (log_every=10, stop after step 3)."""
    out = train(tiny(corpus_file, tmp_path / "r", log_every=10, steps=6), stop_after=3)
    assert out["stopped"] and out["steps_done"] == 3
    assert out["elapsed_s"] > 0


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(corpus_file, tmp_path, capsys):
    """ckpt.pt torn (a disk error, a copy cut short): resume says so, continues from ckpt.prev.pt, keeps
    the bad file aside, and still ends with the uninterrupted run's weights (resume is exact)."""
    full = tmp_path / "full"
    train(tiny(corpus_file, full, ckpt_every=2))
    out = tmp_path / "cut"
    train(tiny(corpus_file, out, ckpt_every=2), stop_after=5)  # ckpt.pt: step 5, ckpt.prev.pt: step 4
    assert checkpoint.load(out / checkpoint.PREV_NAME)["step"] == 4
    bad = out / "ckpt.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    capsys.readouterr()
    resumed = train(tiny(corpus_file, out, ckpt_every=2), resume=True)
    err = capsys.readouterr().err
    assert f"checkpoint '{bad}' is damaged or truncated" in err and "'ckpt.prev.pt'" not in err
    assert f"resuming from the previous checkpoint '{out / 'ckpt.prev.pt'}' (step 4)" in err
    assert (out / "ckpt.pt.corrupt").exists() and resumed["finished"]
    assert json.loads((out / "run.json").read_text())["resumed_from_steps"] == [4]
    a, b = _params(full), _params(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_going_on_from_an_earlier_checkpoint_drops_its_old_summary(
    corpus_file, tmp_path, capsys
):
    """Its final ckpt.pt damaged, a finished run goes on from ckpt.prev.pt; stopped again before its end,
    the old summary.json would still call it finished (compare: "done", with mid-run weights)."""
    out = tmp_path / "r"
    train(tiny(corpus_file, out, steps=8, ckpt_every=2))  # ckpt.pt: step 8, ckpt.prev.pt: step 6
    bad = out / "ckpt.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    capsys.readouterr()
    s = train(tiny(corpus_file, out, steps=8, ckpt_every=2), resume=True, stop_after=7)
    assert not s["finished"] and not (out / "summary.json").exists()
    assert (
        "described the run's earlier end; removed, as the run continues from step 6"
        in capsys.readouterr().err
    )
    assert train(tiny(corpus_file, out, steps=8, ckpt_every=2), resume=True)["finished"]
    assert json.loads((out / "summary.json").read_text())["finished"]


def test_a_ckpt_pt_folder_is_set_aside_before_training(corpus_file, tmp_path, capsys):
    """It used to be taken for a missing file: the run trained to its next save, which then failed."""
    out = tmp_path / "r"
    train(tiny(corpus_file, out, steps=9), stop_after=7)  # checkpoints at steps 6 and 7
    (out / "ckpt.pt").unlink()
    (out / "ckpt.pt").mkdir()
    capsys.readouterr()
    assert train(tiny(corpus_file, out, steps=9), resume=True)["finished"]
    assert f"checkpoint '{out / 'ckpt.pt'}' is not a file; resuming" in capsys.readouterr().err
    assert (out / "ckpt.pt.corrupt").is_dir() and checkpoint.load(out / "ckpt.pt")["step"] == 9


def test_a_damaged_checkpoint_without_a_fallback_is_a_one_line_error(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(corpus_file, out, ckpt_every=0), stop_after=2)  # one checkpoint, no ckpt.prev.pt
    raw = bytearray((out / "ckpt.pt").read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # 64 bytes zeroed: loaded silently before
    (out / "ckpt.pt").write_bytes(bytes(raw))
    rc, err = _cli(capsys, "train", "--resume", *flags({**TINY_RUN, "data": corpus_file, "out_dir": out}))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"checkpoint '{out / 'ckpt.pt'}' is corrupt" in err and "no usable checkpoint" in err
    # it says what to do (--resume refused it, a new run is refused in a folder holding one): doing so
    # starts the run over
    assert "delete it and run again with --resume to start the run over from step 0" in err
    (out / "ckpt.pt").unlink()
    rc, err = _cli(capsys, "train", "--resume", *flags({**TINY_RUN, "data": corpus_file, "out_dir": out}))
    assert rc == 0 and "starting it over from step 0" in err


@pytest.mark.slow
def test_resume_from_killed_subprocess(corpus_file, tmp_path):
    """A real kill (SIGKILL) of `htmuon train` after a checkpoint, then --resume: no gap, no repeat.

    Deterministic on any machine speed: the kill waits (without a deadline that a slow machine could
    hit) for the first checkpoint, and the run is long enough that it cannot finish in between."""
    out = tmp_path / "run"
    steps = 200
    args = [
        sys.executable, "-m", "htmuon.cli", "train", "--model", "llama-micro", "--data", str(corpus_file),
        "--vocab-size", "320", "--seq-len", "32", "--batch-size", "8", "--steps", str(steps),
        "--warmup-steps", "2", "--eval-every", "1000", "--eval-batches", "1", "--ckpt-every", "2",
        "--log-every", "1", "--threads", "1", "--progress", "none", "--no-alpha", "--optimizer", "muon",
        "--out-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            # only a hang guard: the loop ends when the first checkpoint appears or the process exits
            deadline = time.monotonic() + 1800
            while proc.poll() is None and time.monotonic() < deadline:
                if (out / "ckpt.pt").exists():
                    break
                time.sleep(0.01)
            proc.kill()
        finally:
            proc.wait()
    log = (tmp_path / "stderr.txt").read_text()
    assert (out / "ckpt.pt").exists(), f"no checkpoint before the process ended ({proc.returncode}):\n{log}"
    step = checkpoint.load(out / "ckpt.pt")["step"]
    assert 2 <= step < steps, log
    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, steps + 1))  # no duplicates, no gaps
    assert json.loads((out / "run.json").read_text())["resumed_from_steps"] == [step]


# ----------------------------------------------------------------------------- bad input


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = cli_main(list(argv))
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--optimizer", "sgdx"], "unknown optimizer 'sgdx'"),
        (["--model", "gpt5"], "unknown model preset 'gpt5'"),
        (["--data", "/no/such/file.txt"], "data source '/no/such/file.txt' not found"),
        (["--data", "mnist"], "data source 'mnist' not found"),
        (["--model", "resnet-micro", "--data", "shakespeare"], "use --data digits"),
        (["--model", "resnet-micro", "--data", "imagenet:/x"], "imagenet folder '/x' lacks 'train/'"),
        (["--steps", "ten"], "config key 'steps' must be an integer, got 'ten'"),
        (["--lr", "-1"], "config key 'lr' must be > 0, got -1.0"),
        (
            ["--routing", "sideways"],
            "config key 'routing' must be one of ['standard', 'paper'], got 'sideways'",
        ),
        (["--config", "/no/such.toml"], "config file '/no/such.toml' not found"),
        (["--seed", "-1"], "config key 'seed' must be in [0, 2**32), got -1"),
        (["--seed", "4294967296"], "config key 'seed' must be in [0, 2**32), got 4294967296"),
        (["--device", "meta"], "device 'meta' is not supported for training"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, capsys, tmp_path):
    rc, err = _cli(capsys, "train", "--out-dir", str(tmp_path / "r"), "--progress", "none", *argv)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_empty_data_file_and_bad_config_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    rc, err = _cli(capsys, "train", "--data", str(empty), "--out-dir", str(tmp_path / "r"))
    assert rc == 2 and "is empty" in err
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"steps": "100"}))
    rc, err = _cli(capsys, "train", "--config", str(cfg), "--out-dir", str(tmp_path / "r"))
    assert rc == 2 and "config key 'steps' must be an integer, got '100' in" in err
    cfg.write_text(json.dumps({"stepz": 100}))
    rc, err = _cli(capsys, "train", "--config", str(cfg))
    assert rc == 2 and "unknown config key 'stepz'" in err
    toml = tmp_path / "run.toml"
    toml.write_text('optimizer = "muon"\nsteps = 70\nlr = 0.05\n')
    c = make_config({"steps": 3, "seed": 4}, str(toml), {"lr": "0.01"}, strings=True)
    assert (c.optimizer, c.steps, c.lr, c.seed) == ("muon", 70, 0.01, 4)


def test_a_config_file_that_is_not_utf8_is_a_one_line_error(capsys, tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_bytes(b'{"steps": 3, "note": "\xff\xfe"}')
    rc, err = _cli(capsys, "train", "--config", str(cfg), "--out-dir", str(tmp_path / "r"))
    assert rc == 2 and f"config file '{cfg}' is not UTF-8 text" in err and "Traceback" not in err


def test_a_finished_run_whose_checkpoints_were_deleted_is_reused_not_retrained(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    first = train(tiny(corpus_file, out))
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        (out / name).unlink()
    metrics = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    again = train(tiny(corpus_file, out), resume=True)
    assert again == first and (out / "metrics.jsonl").read_bytes() == metrics
    assert (
        "holds a finished run (summary.json) with no checkpoint left: reusing its summary"
        in capsys.readouterr().err
    )


def test_resuming_on_changed_data_is_refused(corpus_file, tmp_path):
    """The run records a digest of its tokens; an edited corpus (retokenised: other tokens at the same
    count) must not be trained on from the old weights and loader position."""
    data_file = tmp_path / "corpus.txt"
    text = corpus_file.read_text(encoding="utf-8")
    data_file.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    train(tiny(data_file, out), stop_after=3)
    data_file.write_text(text.replace(" the ", " thy ", 50), encoding="utf-8")
    with pytest.raises(
        UserError, match=r"the data of the run in .* changed since it was started \(tokens_digest"
    ):
        train(tiny(data_file, out), resume=True)
    data_file.write_text(text, encoding="utf-8")  # the same text again (a new mtime): resumes
    assert train(tiny(data_file, out), resume=True)["finished"]


def test_changed_data_is_refused_even_when_run_json_is_gone(corpus_file, tmp_path, capsys):
    """The data's identity is in the checkpoint too: without run.json (deleted, or replaced after its
    "fix or delete it" error) the check used to be skipped silently, and run.json was rewritten
    without the run's seed, versions or data."""
    data_file = tmp_path / "corpus.txt"
    text = corpus_file.read_text(encoding="utf-8")
    data_file.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    train(tiny(data_file, out), stop_after=3)
    (out / "run.json").unlink()
    lines = text.splitlines(keepends=True)  # two lines swapped: the same tokens, in another order
    i = next(i for i in range(100, len(lines)) if lines[i] != lines[i + 1] and lines[i].strip())
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    data_file.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(UserError, match=r"the data of the run in .* changed since it was started"):
        train(tiny(data_file, out), resume=True)
    data_file.write_text(text, encoding="utf-8")
    (out / "config.json").write_text("{ torn")
    capsys.readouterr()
    assert train(tiny(data_file, out), resume=True)["finished"]
    err = capsys.readouterr().err
    assert f"no run.json in '{out}'" in err and f"'{out / 'config.json'}'" in err
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and run["data"]["tokens_digest"] and run["resumed_from_steps"] == [3]
    assert json.loads((out / "config.json").read_text())["steps"] == 6  # written again


def test_a_config_json_edited_since_the_checkpoint_is_named_and_written_again(corpus_file, tmp_path, capsys):
    """The run resumes from its checkpoint's config; a config.json edited since (another lr, more steps,
    a key the config does not know) was kept as it was, silently: the folder then described a run it did
    not hold (``compare`` reads the lr, steps and evaluation sizes of its report from it)."""
    out = tmp_path / "run"
    train(tiny(corpus_file, out), stop_after=3)
    cfg = json.loads((out / "config.json").read_text())
    for stop, edit, named in (
        (4, {"lr": 0.5, "steps": 20}, "lr=0.5 vs"),
        (5, {"nonsense_key": 1}, "nonsense_key"),
    ):
        (out / "config.json").write_text(json.dumps({**cfg, **edit}))
        capsys.readouterr()
        train(tiny(corpus_file, out), resume=True, stop_after=stop)
        err = capsys.readouterr().err
        assert str(out / "config.json") in err and named in err and "written again" in err, err
        assert json.loads((out / "config.json").read_text()) == cfg
    assert train(tiny(corpus_file, out), resume=True)["finished"]  # unedited: nothing said
    assert "config.json" not in capsys.readouterr().err


def test_a_run_folder_in_use_by_another_process_is_refused(corpus_file, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus_file, out), stop_after=3)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(f"{helper.pid} {socket.gethostname()}\n")
        with pytest.raises(
            UserError, match=rf"'{out}' is in use by another training process.*process {helper.pid}"
        ):
            train(tiny(corpus_file, out), resume=True)
    finally:
        helper.kill()
        helper.wait()
    # its process is gone: the lock is stale and taken over; released when the run ends
    assert train(tiny(corpus_file, out), resume=True)["finished"]
    assert not (out / "run.lock").exists()


def test_a_second_run_on_the_same_new_folder_is_refused_before_it_writes(corpus_file, tmp_path, monkeypatch):
    """Two runs started on one new --out-dir: the second one, started while the first one builds its
    data and model, is refused before it touches the folder, and the first one's files are whole. (The
    lock used to be taken only once the folder existed, which the first run made after its build: the
    second one passed the "already holds a run" check too, wrote config.json and run.json and replaced
    the metrics files, and the first one went on writing to a metrics.jsonl no longer in the folder.)
    A start that fails after making the folder for its lock leaves no folder behind."""
    import htmuon.train.loop as loop

    out = tmp_path / "run"
    real_build = loop.build_data_and_model

    def failing_build(cfg):
        raise UserError("the data cannot be built")

    monkeypatch.setattr(loop, "build_data_and_model", failing_build)
    with pytest.raises(UserError, match="the data cannot be built"):
        train(tiny(corpus_file, out))
    assert not out.exists()  # the folder made for the lock is removed with it
    with pytest.raises(UserError, match="the data cannot be built"):
        train(tiny(corpus_file, tmp_path / "a" / "b" / "run"))
    assert not (tmp_path / "a").exists()  # and so are the parents made for it
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"'.*link' is a link to '.*nowhere', which does not exist"):
        train(tiny(corpus_file, tmp_path / "link"))

    second = {}

    def build_while_another_run_starts(cfg):
        # the first run holds its lock and is building: a second process starts on the same folder
        # (and ends: refused, or, with the old lock, it trains its whole run first)
        second["folder"] = sorted(p.name for p in out.iterdir()) if out.exists() else None
        argv = [sys.executable, "-m", "htmuon.cli", "train"]
        argv += flags({**TINY_RUN, "data": str(corpus_file), "out_dir": str(out)})
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        second["run"] = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
        second["after"] = sorted(p.name for p in out.iterdir()) if out.exists() else None
        return real_build(cfg)

    monkeypatch.setattr(loop, "build_data_and_model", build_while_another_run_starts)
    summary = train(tiny(corpus_file, out), argv=["first"])
    r = second["run"]
    assert second["folder"] == ["run.lock"]  # the first run's lock, before anything was built
    assert r.returncode == 2, r.stderr
    assert f"run folder '{out}' is in use by another training process" in r.stderr
    assert second["after"] == ["run.lock"]  # the second one wrote nothing
    assert summary["finished"]
    recs = read_metrics(out / "metrics.jsonl")
    assert [x["step"] for x in recs if x["kind"] == "train"] == list(range(1, TINY_RUN["steps"] + 1))
    assert json.loads((out / "run.json").read_text())["argv"] == ["first"]  # the first run's record
    assert not (out / "run.lock").exists()


def test_a_run_lock_naming_this_process_from_before_a_restart_is_taken_over(corpus_file, tmp_path):
    """A run killed while it was PID 1 of a container leaves "1 HOST" in run.lock; after a restart the
    resumed run is PID 1 again on the same host name. The lock names this process, which did not take
    it: a leftover, taken over (it used to be refused as "in use by another training process")."""
    out = tmp_path / "run"
    train(tiny(corpus_file, out), stop_after=3)
    (out / "run.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    assert train(tiny(corpus_file, out), resume=True)["finished"]
    assert not (out / "run.lock").exists()


def test_metrics_with_garbage_bytes_resume(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(corpus_file, out), stop_after=3)
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage \x00\n")
    capsys.readouterr()
    assert train(tiny(corpus_file, out), resume=True)["finished"]
    assert "damaged" not in capsys.readouterr().err  # the last line: torn by a kill, as expected
    raw = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    raw[2] = raw[2][:10] + b"\n"  # a line torn in the middle of the file: damage, and said so
    (out / "metrics.jsonl").write_bytes(b"".join(raw[:8]))
    (out / "summary.json").unlink()
    (out / "ckpt.pt").unlink()  # back to the checkpoint of step 3 (ckpt.prev.pt)
    assert train(tiny(corpus_file, out), resume=True)["finished"]
    assert f"'{out / 'metrics.jsonl'}': 1 damaged line(s) dropped (line 3)" in capsys.readouterr().err


def test_metrics_lines_that_are_not_records_are_dropped_on_resume(corpus_file, tmp_path, capsys):
    """A damaged metrics.jsonl line that is valid JSON but no record (a number, no step, a mangled key)
    used to crash the resume with a TypeError / KeyError / csv ValueError traceback."""
    out = tmp_path / "run"
    train(tiny(corpus_file, out), stop_after=3)
    good = read_metrics(out / "metrics.jsonl")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('3\n{"kind": "train", "loss": 1.0}\n{"step": "2", "kind": "train", "loss": 1.0}\n')
        f.write('{"step": 2, "kind": "train", "lozs": 1.0}\n')
        f.write('{"step": 2, "kind": "val", "loss": 1.0, "x": 0}\n')
    assert read_metrics(out / "metrics.jsonl") == good
    capsys.readouterr()
    assert train(tiny(corpus_file, out), resume=True)["finished"]
    assert (
        f"'{out / 'metrics.jsonl'}': 4 damaged line(s) dropped (line 5, 6, 7, 8)" in capsys.readouterr().err
    )
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][: len(good)] == [r["step"] for r in good]


def test_the_lr_hint_is_given_only_when_the_lrs_are_all_that_differ(corpus_file, tmp_path):
    """Another optimizer differs in its default lr too; "pass --lr 0.03" would not continue that run."""
    out = tmp_path / "run"
    train(tiny(corpus_file, out, steps=4), stop_after=2)
    with pytest.raises(UserError, match=r"optimizer='htmuon' vs 'muon'.*; nothing changed$"):
        train(tiny(corpus_file, out, steps=4, optimizer="muon"), resume=True)
    with pytest.raises(UserError, match=r"lr=0.03 vs 0.05, steps=4 vs 5\); nothing changed$"):
        train(tiny(corpus_file, out, steps=5, lr=0.05), resume=True)


def test_checkpoint_of_another_config_is_refused_and_nothing_overwritten(corpus_file, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus_file, out, steps=4), stop_after=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"another config.*lr=0.03 vs 0.05.*pass --lr 0.03\)$"):
        train(tiny(corpus_file, out, steps=4, lr=0.05), resume=True)
    with pytest.raises(
        UserError, match=r"adamw_lr=0.001 vs 0.0333\); nothing changed \(.*--adamw-lr 0.001\)$"
    ):
        train(tiny(corpus_file, out, steps=4, adamw_lr=0.0333), resume=True)  # e.g. a preset's new value
    with pytest.raises(UserError, match=r"grad_clip=1.0 vs 0.0\); nothing changed \(.*--grad-clip 1.0\)$"):
        train(tiny(corpus_file, out, steps=4, grad_clip=0.0), resume=True)  # the GPU presets' change
    with pytest.raises(UserError, match=r"seq_len=16 vs 32\); nothing changed$"):
        train(tiny(corpus_file, out, steps=4, seq_len=32), resume=True)  # no lr: no hint
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny(corpus_file, out, steps=4))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_user_error_has_no_traceback_in_a_real_process(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "htmuon.cli",
            "train",
            "--optimizer",
            "lion",
            "--out-dir",
            str(tmp_path / "x"),
        ],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "htmuon train: error: unknown optimizer 'lion' (choose from " + ", ".join(OPTIMIZERS) + ")"
    )


def test_hf_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": [f"train document {i}. " * 30 for i in range(20)]}),
            "validation": datasets.Dataset.from_dict({"text": [f"held out {i}. " * 30 for i in range(3)]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    s = text_splits(f"hf-disk:{tmp_path / 'ds'}", 0.05)
    assert (len(s.train), len(s.val)) == (20, 3) and "held out 0" in s.val[0][0]
    with pytest.raises(UserError, match="no field 'body'"):
        text_splits(f"hf-disk:{tmp_path / 'ds'}", 0.05, text_field="body")


@pytest.mark.parametrize("routing", ["standard", "paper"])
def test_optimizer_routing_and_weight_decay_groups(routing):
    from htmuon.train.models import build_llama
    from htmuon.train.optimizers import build_optimizer, resolve

    model = build_llama("llama-micro", 320, 16)
    cfg = resolve(TrainConfig(optimizer="htmuon", routing=routing, weight_decay=0.1, adamw_lr=2e-3))
    opt = build_optimizer(model, cfg)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    q, norm = model.model.layers[0].self_attn.q_proj.weight, model.model.norm.weight
    assert by_id[id(q)]["algorithm"] == "htmuon" and by_id[id(q)]["lr"] == cfg.lr == 0.03
    want = "adamw" if routing == "standard" else "htmuon"
    assert by_id[id(emb)]["algorithm"] == want and by_id[id(head)]["algorithm"] == want
    assert by_id[id(emb)]["weight_decay"] == 0.1 and by_id[id(head)]["weight_decay"] == 0.1
    assert by_id[id(norm)]["algorithm"] == "adamw" and by_id[id(norm)]["weight_decay"] == 0.0
    assert by_id[id(norm)]["lr"] == 2e-3
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_a_resume_without_metrics_jsonl_says_its_records_are_lost(corpus_file, tmp_path, capsys):
    """metrics.jsonl deleted (or lost) before a resume: the run goes on from its checkpoint with no
    records before it (the curves and the status start there), which it did without a word."""
    out = tmp_path / "run"
    train(tiny(corpus_file, out), stop_after=4)
    (out / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert train(tiny(corpus_file, out), resume=True)["finished"]
    err = capsys.readouterr().err
    assert f"no '{out / 'metrics.jsonl'}' (deleted?): the records of steps 1-4 are lost" in err, err
    assert min(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 5


def test_the_metrics_are_on_disk_before_each_checkpoint(corpus_file, tmp_path, monkeypatch):
    """A checkpoint is fsynced; the metrics records up to its step were only flushed: after a power loss
    or an OS crash the checkpoint could hold a later step than metrics.jsonl, and the resumed run had a
    gap in its records, silently. Both metrics files are fsynced before each checkpoint is written."""
    out, synced, real = tmp_path / "run", [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_ino, st.st_size))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    train(tiny(corpus_file, out), stop_after=3)  # one checkpoint, at step 3, the run's last write
    monkeypatch.undo()
    ckpt = next(i for i, (ino, _) in enumerate(synced) if ino == (out / "ckpt.pt").stat().st_ino)
    for name in ("metrics.jsonl", "metrics.csv"):  # each with every record, before the checkpoint
        st = (out / name).stat()
        assert (st.st_ino, st.st_size) in synced[:ckpt], name


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """checkpoint.save goes through atomic_write: an error while writing keeps the old file intact
    and removes the temp file."""
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"step": 1, "w": torch.arange(4.0)})

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(UserError, match=f"cannot write checkpoint '{path}': disk full"):
        checkpoint.save(path, {"step": 2, "w": torch.zeros(4)})
    monkeypatch.undo()
    loaded = checkpoint.load(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_tensorboard_events_follow_a_resume_as_the_records_do(corpus_file, tmp_path, monkeypatch):
    """With --tensorboard, a resume dropped the records after the checkpoint from metrics.jsonl but left
    their events in tb/ (TensorBoard then drew the undone steps beside their re-run), and the writer's
    buffer (up to two minutes of events) was not flushed before a checkpoint, so a kill after it left a
    gap in the curves. The writer of a resumed run now purges from the step after the checkpoint, and
    its events are flushed before every checkpoint."""
    from htmuon.train import loop

    log: list = []

    class Writer:  # torch's SummaryWriter's interface (the tensorboard package is optional)
        def __init__(self, log_dir, purge_step=None):
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            log.append(("open", purge_step))

        def add_scalar(self, tag, value, step):
            log.append(("event", step))

        def flush(self):
            log.append(("flush", None))

        def close(self):
            pass

    real_save = checkpoint.save
    monkeypatch.setattr(loop, "require_tensorboard", lambda: Writer)
    monkeypatch.setattr(
        checkpoint,
        "save",
        lambda path, payload: (log.append(("save", payload["step"])), real_save(path, payload)),
    )
    out = tmp_path / "run"
    train(tiny(corpus_file, out, tensorboard=True, ckpt_every=2), stop_after=3)  # checkpoints at 2 and 3
    assert log[0] == ("open", None)  # a new run: nothing to purge
    for i, (what, _) in enumerate(log):
        if what == "save":  # every event before it is flushed
            last_event = max(j for j in range(i) if log[j][0] == "event")
            assert any(log[j][0] == "flush" for j in range(last_event + 1, i)), log
    log.clear()
    (out / "ckpt.pt").unlink()  # as if killed before the checkpoint at step 3: resumed from step 2
    train(tiny(corpus_file, out, tensorboard=True, ckpt_every=2), resume=True)
    assert log[0] == ("open", 3)
