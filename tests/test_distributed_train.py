"""`htmuon train` under torchrun (2 CPU processes, gloo): DDP and FSDP2 runs match the single-process run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import TINY_RUN, flags, needs_fsdp2  # noqa: E402
from htmuon.train import checkpoint  # noqa: E402
from htmuon.train.config import TrainConfig  # noqa: E402
from htmuon.train.loop import train  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
#: DDP / FSDP2 average the two ranks' half-batch gradients, the single process takes one mean over
#: the global batch: the same math, rounded differently (measured ~2e-7 / ~3e-7 after 6 steps).
TOL = 1e-5

RUN = {**TINY_RUN, "batch_size": 4, "optimizer": "htmuon-normuon"}  # 4 rows: 2 per rank


def torchrun(args: list[str], cache: Path, rows_dir: Path | None = None) -> subprocess.CompletedProcess:
    """``htmuon train ARGS`` on two torchrun ranks; with ``rows_dir``, each rank writes the rows of every
    training forward to ROWS_DIR/rows{RANK}.jsonl (see _ROW_RECORDER)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "htmuon.cli", "train", *args]
    path = str(SRC)
    if rows_dir is not None:
        hook = rows_dir / "hook"
        hook.mkdir(parents=True)
        (hook / "sitecustomize.py").write_text(_ROW_RECORDER.format(out=str(rows_dir)))
        path = f"{hook}{os.pathsep}{path}"
    env = {**os.environ, "PYTHONPATH": path, "HTMUON_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


#: A sitecustomize for the torchrun children: wraps the training loop's loss so that every training
#: forward (grad enabled; evaluations run without) appends its input rows to rows{RANK}.jsonl.
_ROW_RECORDER = """
import json, os
import torch
import htmuon.train.loop as _loop

_inner = _loop._loss


def _recording_loss(model, task, x, y):
    if torch.is_grad_enabled():
        with open(os.path.join({out!r}, "rows" + os.environ.get("RANK", "0") + ".jsonl"), "a") as f:
            f.write(json.dumps(x.tolist()) + "\\n")
    return _inner(model, task, x, y)


_loop._loss = _recording_loss
"""


def _recorded_rows(path: Path) -> list[list[list[int]]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_losses(path: Path) -> list[float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=needs_fsdp2)])
def test_torchrun_train_matches_single_process(mode, corpus_file, tmp_path, monkeypatch):
    import htmuon.train.loop as loop

    cache = tmp_path / "cache"
    monkeypatch.setenv("HTMUON_CACHE", str(cache))
    single_rows, inner = [], loop._loss

    def recording_loss(model, task, x, y):
        if torch.is_grad_enabled():
            single_rows.append(x.tolist())
        return inner(model, task, x, y)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_loss", recording_loss)
        single = train(TrainConfig(**RUN, data=str(corpus_file), out_dir=str(tmp_path / "single")))
    out = tmp_path / mode
    proc = torchrun(
        flags({**RUN, "data": corpus_file, "parallel": mode, "out_dir": out}), cache, tmp_path / "rows"
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    # each rank trained on its own half of every global batch: rank 0 the first rows, rank 1 the rest
    ranks = [_recorded_rows(tmp_path / "rows" / f"rows{r}.jsonl") for r in (0, 1)]
    assert len(single_rows) == len(ranks[0]) == len(ranks[1]) == 6
    for whole, first, second in zip(single_rows, *ranks):
        assert len(first) == len(second) == RUN["batch_size"] // 2
        assert first + second == whole
    assert proc.stdout.count("done: htmuon-normuon") == 1  # rank 0 reports, the other stays quiet
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps_done"] == 6
    assert summary["final_val_loss"] == pytest.approx(single["final_val_loss"], abs=1e-4)
    # the logged training loss is the global batch's: the mean of the ranks' half-batch means (not
    # their sum), step by step as the single process logs it
    logged = [_train_losses(out / "metrics.jsonl"), _train_losses(tmp_path / "single" / "metrics.jsonl")]
    assert len(logged[0]) == len(logged[1]) == 6
    assert logged[0] == pytest.approx(logged[1], abs=1e-4)
    run = json.loads((out / "run.json").read_text())
    assert run["parallel"] == {"mode": mode, "processes": 2}
    a = checkpoint.load(tmp_path / "single" / "ckpt.pt")["model"]
    b = checkpoint.load(out / "ckpt.pt")["model"]  # whole tensors, also under FSDP2
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < TOL, worst
    assert all(isinstance(v, torch.Tensor) and type(v) is torch.Tensor for v in b.values())


def test_parallel_mode_without_torchrun_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    from htmuon.cli import main as cli_main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc = cli_main(["train", "--parallel", "fsdp", "--out-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "parallel='fsdp' needs a torchrun launch" in err and "Traceback" not in err
    rc = cli_main(["train", "--parallel", "dp", "--out-dir", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "config key 'parallel' must be one of" in err and "got 'dp'" in err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_train(corpus_file, tmp_path, monkeypatch, dist_timeout: int) -> tuple[list[str], dict]:
    """The command and environment of a long 2-rank DDP `htmuon train` into tmp_path/run; the token
    cache is filled beforehand, so that rank 1 does not wait for the tokenizer."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HTMUON_CACHE", str(cache))
    warm = {**RUN, "steps": 2, "warmup_steps": 1, "data": str(corpus_file), "out_dir": str(tmp_path / "w")}
    train(TrainConfig(**warm))
    run = {**RUN, "steps": 5000, "eval_every": 5000, "ckpt_every": 0, "data": corpus_file, "parallel": "ddp"}
    args = [sys.executable, "-m", "htmuon.cli", "train", *flags({**run, "out_dir": tmp_path / "run"})]
    env = {**os.environ, "PYTHONPATH": str(SRC), "HTMUON_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env["HTMUON_DIST_TIMEOUT"] = str(dist_timeout)
    return args, env


@contextlib.contextmanager
def _training_ranks(args: list[str], env: dict, tmp_path: Path):
    """Start ranks 0 and 1 (stderr to tmp_path/rankN.err) and yield them once both train, i.e. once
    rank 0 has logged a step, which needed rank 1's gradients (no deadline a slow machine could hit:
    the guard only catches a hang); both are killed at the end."""
    procs, logs = [], []
    try:
        for rank in (0, 1):
            logs.append(open(tmp_path / f"rank{rank}.err", "w+"))
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen(args, env=rank_env, stdout=subprocess.DEVNULL, stderr=logs[-1]))
        metrics = tmp_path / "run" / "metrics.jsonl"
        guard = time.monotonic() + 1800
        while not (metrics.exists() and metrics.read_text().strip()):
            assert procs[0].poll() is None and procs[1].poll() is None, (tmp_path / "rank0.err").read_text()
            assert time.monotonic() < guard
            time.sleep(0.05)
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for f in logs:
            f.close()


@pytest.mark.distributed
def test_a_hung_rank_ends_the_job_with_one_line(corpus_file, tmp_path, monkeypatch):
    """Two ranks (launched as torchrun would: RANK, WORLD_SIZE, MASTER_*), a 30 s collective timeout; once
    training runs, rank 1 is stopped (SIGSTOP). Rank 0 must exit with code 2 and one line naming the
    cause -- before, it waited in the collective forever (an outer timeout killed it). (A killed rank
    fails the peer's collective at once, "Connection reset by peer": the same path, checked by hand and
    by the unit test below; torchrun itself also stops the job when a worker dies.)

    30 s, not less: the ranks' legitimate waits for each other (start-up imports, rank 0 building the
    model while rank 1 waits) must stay well inside it on a loaded machine; the token cache is filled
    beforehand so rank 1 does not wait for the tokenizer."""
    args, env = _two_rank_train(corpus_file, tmp_path, monkeypatch, 30)
    with _training_ranks(args, env, tmp_path) as procs:
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        rc = procs[0].wait(timeout=600)  # without the timeout this waits forever
        waited = time.monotonic() - stopped
    err = (tmp_path / "rank0.err").read_text().strip()
    assert rc == 2, err[-3000:]
    # ended by the 30 s collective timeout, not by another path (its clock may have started before the
    # SIGSTOP: rank 0 may already wait in the collective rank 1 was about to join, on a loaded machine
    # for seconds)
    assert 20.0 <= waited < 300.0, waited
    last = err.splitlines()[-1]
    assert last.startswith("htmuon train: error: rank 0 of 2: a collective failed: rank 1 hung or died")
    assert "waited up to 30 s; set HTMUON_DIST_TIMEOUT" in last and "Traceback" not in err


@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(corpus_file, tmp_path, monkeypatch):
    """A preemption signal may reach only some ranks. The ranks agree on it in the step's one collective
    (the logged loss's all-reduce): all stop after the same step, rank 0 writes the checkpoint, and
    every rank exits 143. Without the agreement, the signalled rank would stop alone and the other
    would wait in the next step's collective."""
    # ranks that disagreed would fail (exit 2) within a minute
    args, env = _two_rank_train(corpus_file, tmp_path, monkeypatch, 60)
    with _training_ranks(args, env, tmp_path) as procs:
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=600) for p in procs]
    out, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    err0 = (tmp_path / "rank0.err").read_text().strip()
    assert codes == [143, 143], err0[-3000:]
    last = err0.splitlines()[-1]
    prefix = "htmuon train: stopped by a signal to another rank after step "
    assert last.startswith(prefix) and last.endswith(
        f", with a checkpoint; continue with --resume --out-dir {out}"
    )
    step = int(last[len(prefix) :].split(",")[0])
    assert checkpoint.load(out / "ckpt.pt")["step"] == step
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert max(logged) == step  # log_every 1: the last step logged is the one the checkpoint holds
    assert "Traceback" not in err0 and "Traceback" not in (tmp_path / "rank1.err").read_text()


def test_collective_timeout_setting(monkeypatch):
    from htmuon import torchrun

    monkeypatch.delenv("HTMUON_DIST_TIMEOUT", raising=False)
    assert torchrun.collective_timeout() == torchrun.DEFAULT_TIMEOUT_S == 600
    assert torchrun.collective_timeout(12) == 12.0
    monkeypatch.setenv("HTMUON_DIST_TIMEOUT", "7.5")
    assert torchrun.collective_timeout() == 7.5
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv("HTMUON_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="HTMUON_DIST_TIMEOUT must be a number of seconds > 0, got"):
            torchrun.collective_timeout()


def test_collective_errors_only_convert_collective_failures():
    from htmuon import torchrun
    from htmuon.errors import CollectiveError, UserError

    two = torchrun.Parallel("ddp", 1, 2, timeout_s=9)
    with pytest.raises(
        CollectiveError,
        match=r"^rank 1 of 2: a collective failed: rank 0 hung or died \(waited up to 9 s.*: Timed out",
    ):
        with torchrun.collective_errors(two):
            raise RuntimeError("[third_party/gloo/pair.cc:1] Timed out waiting 9000ms for recv operation")
    with pytest.raises(CollectiveError) as dead:
        with torchrun.collective_errors(two):  # a dead peer, as gloo words it (its advice is dropped)
            raise RuntimeError(
                "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:55495. This is "
                "typically caused by a remote worker crashing. Check the logs of the remote worker."
            )
    assert str(dead.value).endswith(": Connection closed by peer [127.0.0.1]:55495.")
    three = torchrun.Parallel("ddp", 2, 3, timeout_s=9)  # of three, the peer is not known
    with pytest.raises(CollectiveError, match=r"^rank 2 of 3: a collective failed: another rank hung"):
        with torchrun.collective_errors(three):
            raise RuntimeError("Read error [::1]:1: Connection reset by peer")
    # an error of this rank's own (its data, its folder): the rank in front, the type kept, once
    with pytest.raises(UserError, match=r"^rank 1 of 2: cannot read data file 'x'$"):
        with torchrun.collective_errors(two):
            with torchrun.collective_errors(two):
                raise UserError("cannot read data file 'x'")
    with pytest.raises(UserError, match=r"^cannot read data file 'x'$"):  # alone: unchanged
        with torchrun.collective_errors(torchrun.Parallel()):
            raise UserError("cannot read data file 'x'")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not a collective failure: unchanged
        with torchrun.collective_errors(two):
            raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="Timed out"):  # a single process: unchanged
        with torchrun.collective_errors(torchrun.Parallel()):
            raise RuntimeError("Timed out")


def test_check_same_names_the_differing_keys_and_ranks(monkeypatch):
    """Each rank's values as all_gather_object would return them (no processes needed)."""
    import torch.distributed as dist

    from htmuon import torchrun
    from htmuon.errors import UserError

    same, other = {"seed": 0, "steps": 6}, {"seed": 1, "steps": 6}
    ranks = [same, dict(same), other, {"seed": 1, "steps": 8}]  # the keys shown: the first such rank's

    def gather(out, _value):
        out[:] = [dict(v) for v in ranks]

    monkeypatch.setattr(dist, "all_gather_object", gather)
    par = torchrun.Parallel("ddp", 1, 4)
    with pytest.raises(UserError) as e:
        torchrun.check_same(ranks[1], par, "configs")
    assert str(e.value) == (  # rank 3 differs in steps too: it is not said to differ in seed only
        "rank 1 of 4: the ranks run with different configs: rank 2 differs from rank 0 in seed (0 vs 1); "
        "rank(s) 3 differ from rank 0 too; start every rank with the same flags, config file and data"
    )
    ranks[2:] = [dict(ranks[0]), dict(ranks[0])]
    torchrun.check_same(ranks[1], par, "configs")  # all alike: nothing
    torchrun.check_same({"seed": 5}, torchrun.Parallel())  # a single process: nothing to compare


@pytest.mark.distributed
def test_ranks_started_with_different_configs_are_refused(corpus_file, tmp_path):
    """Two ranks launched by hand (RANK, WORLD_SIZE, MASTER_*) with other flags: before, other seeds trained
    silently on slices of different batches (the run finished), and other ckpt_every values left rank 0's
    checkpoint barrier unmatched until the collective timeout ("hung or died"). Now both refuse at the
    start with one line naming the keys, and nothing is written."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "htmuon.cli", "train", *flags({**RUN, "data": corpus_file, "out_dir": out})]
    env = {**os.environ, "PYTHONPATH": str(SRC), "HTMUON_CACHE": str(tmp_path / "c"), "OMP_NUM_THREADS": "1"}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env["HTMUON_DIST_TIMEOUT"] = "60"
    extra = [["--seed", "0", "--ckpt-every", "3"], ["--seed", "1", "--ckpt-every", "2"]]
    procs = [
        subprocess.Popen(
            args + extra[rank],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            f"htmuon train: error: rank {rank} of 2: the ranks run with different configs: rank 1 differs "
            "from rank 0 in seed (0 vs 1), ckpt_every (3 vs 2); start every rank with the same flags, config "
            "file and data"
        )
        assert "Traceback" not in err
    assert not out.exists()
