"""`htmuon train` under torchrun (2 CPU processes, gloo): DDP and FSDP2 runs match the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import TINY_RUN, flags  # noqa: E402
from htmuon.train import checkpoint  # noqa: E402
from htmuon.train.config import TrainConfig  # noqa: E402
from htmuon.train.loop import train  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
#: DDP / FSDP2 average the two ranks' half-batch gradients, the single process takes one mean over
#: the global batch: the same math, rounded differently (measured ~2e-7 / ~3e-7 after 6 steps).
TOL = 1e-5

RUN = {**TINY_RUN, "batch_size": 4, "optimizer": "htmuon-normuon"}  # 4 rows: 2 per rank


def torchrun(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "htmuon.cli", "train", *args]
    env = {**os.environ, "PYTHONPATH": str(SRC), "HTMUON_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_train_matches_single_process(mode, corpus_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HTMUON_CACHE", str(cache))
    single = train(TrainConfig(**RUN, data=str(corpus_file), out_dir=str(tmp_path / "single")))
    out = tmp_path / mode
    proc = torchrun(flags({**RUN, "data": corpus_file, "parallel": mode, "out_dir": out}), cache)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("done: htmuon-normuon") == 1  # rank 0 reports, the other stays quiet
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps_done"] == 6
    assert summary["final_val_loss"] == pytest.approx(single["final_val_loss"], abs=1e-4)
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
    assert rc == 2 and "config key 'parallel' must be one of" in capsys.readouterr().err
