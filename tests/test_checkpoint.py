"""Training checkpoints: checksum at load, the previous checkpoint kept and used as a fallback, stale
temp files removed, a full disk reported as one line."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch

from htmuon.cli import main as cli_main
from htmuon.train import checkpoint, data
from htmuon.train.checkpoint import CheckpointError


def payload(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "model": {"w": torch.randn(64, 48, generator=g), "b": torch.randn(48, generator=g)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.randn(64, 48, generator=g)}}, "lr": 0.02},
    }


def same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def flip(path: Path, offset: int, mask: int = 0xFF, length: int = 1) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + length):
        raw[i] ^= mask
    path.write_bytes(bytes(raw))


def test_round_trip_and_plain_torch_load_still_reads_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, payload(3))
    assert checkpoint.verify(path) is True
    assert same(checkpoint.load(path), payload(3))
    assert same(checkpoint.load(str(path)), payload(3))  # a string path too (it raised AttributeError)
    raw = path.read_bytes()
    assert raw[-checkpoint.TRAILER_LEN :].startswith(checkpoint.TRAILER_MAGIC)
    assert same(torch.load(path, weights_only=True), payload(3))  # the trailer does not hide the archive
    checkpoint.save(str(path), payload(4))  # save takes a string path too (it raised AttributeError)
    assert same(checkpoint.load(path), payload(4))
    assert same(checkpoint.load(path.with_name(checkpoint.PREV_NAME)), payload(3))


@pytest.mark.parametrize("torch_2_5_unpickler", [False, True])
def test_an_optimizer_state_holding_a_set_or_a_complex_loads(torch_2_5_unpickler, tmp_path, monkeypatch):
    """heavyball (the ``cadamw`` baseline) keeps a set in its state_dict; torch 2.4-2.5's weights-only
    unpickler refuses ``builtins.set`` and ``builtins.complex`` (2.6 takes them), so such a run could not
    resume there. Simulated here by removing the two from the unpickler's built-in allowlist: a plain
    weights-only load then fails as on torch 2.5, checkpoint.load reads the file, and the process-wide
    allowlist is left as it was."""
    import pickle

    from torch import _weights_only_unpickler as unpickler

    if torch_2_5_unpickler:
        newer = ("builtins.set", "builtins.complex")
        allowed = {k: v for k, v in unpickler._get_allowed_globals().items() if k not in newer}
        monkeypatch.setattr(unpickler, "_get_allowed_globals", lambda: allowed)
    path = tmp_path / "ckpt.pt"
    state = payload(3)
    state["optimizer"]["param_groups"] = [{"params": [0], "kinds": {"a", "b"}, "z": 1 + 2j}]
    checkpoint.save(path, state)
    if torch_2_5_unpickler:
        with pytest.raises(pickle.UnpicklingError, match=r"GLOBAL (builtins\.)?(set|complex) "):
            torch.load(path, weights_only=True)
    before = set(torch.serialization.get_safe_globals())
    got = checkpoint.load(path)
    assert same(got, state)
    assert got["optimizer"]["param_groups"] == [{"params": [0], "kinds": {"a", "b"}, "z": 1 + 2j}]
    assert set(torch.serialization.get_safe_globals()) == before


# where a flip lands: the archive's start, inside it (tensor data, pickle, directory), its last byte,
# the trailer's magic, the digest, the trailer's final newline
WHERE = {
    "first byte": lambda n: 0,
    "quarter": lambda n: n // 4,
    "middle": lambda n: n // 2,
    "three quarters": lambda n: 3 * n // 4,
    "archive end": lambda n: n - checkpoint.TRAILER_LEN - 1,
    "trailer magic": lambda n: n - checkpoint.TRAILER_LEN + 3,
    "digest": lambda n: n - 30,
    "last byte": lambda n: n - 1,
}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("kind", ["byte", "bit", "64 bytes"])
def test_any_flipped_byte_or_bit_is_detected(where, kind, tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, payload(1))
    n = path.stat().st_size
    at = WHERE[where](n)
    if kind == "64 bytes":
        flip(path, min(at, n - 64), length=64)
    else:
        flip(path, at, mask=0x10 if kind == "bit" else 0xFF)
    with pytest.raises(CheckpointError, match=str(path)):
        checkpoint.load(path)


@pytest.mark.parametrize("keep", [0, 1000, -1])
def test_a_truncated_checkpoint_is_detected(keep, tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, payload(1))
    raw = path.read_bytes()
    path.write_bytes(raw[: keep if keep >= 0 else len(raw) + keep])
    with pytest.raises(
        CheckpointError, match=f"^checkpoint '{re.escape(str(path))}' is (damaged or )?truncated"
    ):
        checkpoint.load(path)


def test_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    for step in (1, 2, 3):
        checkpoint.save(path, payload(step))
    assert same(checkpoint.load(path), payload(3))
    assert same(checkpoint.load(tmp_path / checkpoint.PREV_NAME), payload(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.prev.pt", "ckpt.pt"]  # no temp files


def test_load_latest_falls_back_to_the_previous_and_names_the_bad_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    assert checkpoint.load_latest(tmp_path) == (None, None, [])
    checkpoint.save(path, payload(1))
    checkpoint.save(path, payload(2))
    flip(path, path.stat().st_size // 2)
    got, used, notes = checkpoint.load_latest(tmp_path)
    assert same(got, payload(1)) and used == tmp_path / checkpoint.PREV_NAME
    assert len(notes) == 1 and str(path) in notes[0] and "previous checkpoint" in notes[0]
    flip(tmp_path / checkpoint.PREV_NAME, 100)
    with pytest.raises(CheckpointError, match="ckpt.pt.*ckpt.prev.pt.*no usable checkpoint"):
        checkpoint.load_latest(tmp_path)


@pytest.mark.parametrize("what", ["folder", "dangling link"])
def test_a_ckpt_pt_that_is_not_a_file_is_named_and_set_aside(what, tmp_path):
    """It was taken for "killed while rotating", and the run trained until its next save failed on it."""
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, payload(1))
    checkpoint.save(path, payload(2))
    path.unlink()
    if what == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "elsewhere.pt")
    got, used, notes = checkpoint.load_latest(tmp_path)
    assert same(got, payload(1)) and used == tmp_path / checkpoint.PREV_NAME
    assert notes == [
        f"checkpoint '{path}' is not a file; resuming from the previous checkpoint '{used}' (step 1)"
    ]
    assert checkpoint.set_aside_corrupt(tmp_path) == tmp_path / "ckpt.pt.corrupt"
    checkpoint.save(path, payload(3))  # the next save works
    assert same(checkpoint.load(path), payload(3))
    path.unlink()
    (tmp_path / checkpoint.PREV_NAME).unlink()
    path.mkdir()
    with pytest.raises(CheckpointError, match="is not a file; no usable checkpoint is left"):
        checkpoint.load_latest(tmp_path)


def test_a_checkpoint_without_checksum_loads_with_a_note(tmp_path):
    """Checkpoints written before the checksum (a bare torch.save archive) are accepted, unverified."""
    path = tmp_path / "ckpt.pt"
    torch.save({"format": checkpoint.FORMAT_UNCHECKED, **payload(5)}, path)
    assert checkpoint.verify(path) is False
    got, used, notes = checkpoint.load_latest(tmp_path)
    assert same(got, payload(5)) and used == path
    assert len(notes) == 1 and "no checksum" in notes[0] and str(path) in notes[0]


def test_a_checkpoint_whose_trailer_was_cut_off_is_refused(tmp_path):
    """A file cut exactly before its 80-byte trailer ends like a plain torch.save archive; its format
    tag says it had a checksum, so it is refused (and load_latest falls back to the previous one),
    never loaded unverified with a flipped bit inside."""
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, payload(1))
    checkpoint.save(path, payload(2))
    data_ = path.read_bytes()
    path.write_bytes(data_[: -checkpoint.TRAILER_LEN])
    assert checkpoint.verify(path) is False
    with pytest.raises(CheckpointError, match="lost its checksum trailer"):
        checkpoint.load(path)
    got, used, notes = checkpoint.load_latest(tmp_path)
    assert same(got, payload(1)) and used == tmp_path / checkpoint.PREV_NAME
    assert "lost its checksum trailer" in notes[0]


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    """torch's, numpy's (with its cached Gaussian) and Python's global RNGs continue where they were
    saved: a resumed run's dropout, augmentation or user code draws what the uninterrupted run drew."""
    import random

    import numpy as np

    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002
    random.seed(3)
    np.random.randn()  # noqa: NPY002 (leaves the second Gaussian of a pair cached)
    checkpoint.save(tmp_path / "ckpt.pt", {"rng": checkpoint.rng_state()})

    def draws():
        return torch.rand(4), np.random.rand(4), np.random.randn(), random.random()  # noqa: NPY002

    want = draws()
    torch.manual_seed(9)
    np.random.seed(9)  # noqa: NPY002
    random.seed(9)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "ckpt.pt")["rng"])
    got = draws()
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2:] == want[2:]


def _scaled_by_global_draws(real_loss):
    """The training loop's loss, scaled by a draw from each of torch's, numpy's and Python's global RNGs
    (as a model with dropout, or user code, draws from them)."""
    import random

    import numpy as np

    def noisy(model, task, x, y):
        loss, logits = real_loss(model, task, x, y)
        noise = float(torch.rand(())) + float(np.random.rand()) + random.random()  # noqa: NPY002
        return loss * (1.0 + noise), logits

    return noisy


def test_a_run_that_draws_random_numbers_resumes_on_the_same_draws(corpus_file, tmp_path, monkeypatch):
    """A model with dropout (any code drawing from torch's, numpy's or Python's global RNG while it
    trains) resumes on the numbers the uninterrupted run drew: the loop puts the checkpoint's RNG
    states back (the built-in models draw none, so the other resume tests cannot tell)."""
    pytest.importorskip("transformers")

    from helpers import TINY_RUN
    from htmuon.train import loop
    from htmuon.train.config import TrainConfig

    monkeypatch.setattr(loop, "_loss", _scaled_by_global_draws(loop._loss))
    # (no clipping: a clipped gradient's norm is the same whatever the loss's scale)
    kw = {**TINY_RUN, "data": str(corpus_file), "optimizer": "adamw", "steps": 6, "ckpt_every": 2}
    kw["grad_clip"] = 0.0
    loop.train(TrainConfig(**kw, out_dir=str(tmp_path / "full")))
    loop.train(TrainConfig(**kw, out_dir=str(tmp_path / "cut")), stop_after=3)
    assert loop.train(TrainConfig(**kw, out_dir=str(tmp_path / "cut")), resume=True)["finished"]
    full, cut = (checkpoint.load(tmp_path / d / "ckpt.pt") for d in ("full", "cut"))
    a, b = full["model"], cut["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    # the step times go on too: the resumed run's ms/step is over all its steps, as the full run's
    assert len(cut["step_times"]) == len(full["step_times"]) == 6


def test_a_seeded_run_draws_the_same_numbers_whatever_was_imported_before(corpus_file, tmp_path, monkeypatch):
    """The same seeded run twice in one process draws the same numbers from Python's and numpy's RNGs,
    although the model library's first import draws from them (transformers 4.57 imports sklearn,
    which imports rich: ``getrandbits(24)``): the global RNGs were seeded before the model was built,
    so the first run differed from the second (2.8e-4 in the weights after 6 steps, torch 2.4.1)."""
    pytest.importorskip("transformers")
    import random

    import numpy as np

    from helpers import TINY_RUN
    from htmuon.train import loop
    from htmuon.train.config import TrainConfig

    real_build, built = loop.build_data_and_model, []

    def build_as_a_first_import_does(cfg):
        if not built:  # only the first time in the process, as an import
            random.getrandbits(24)
            np.random.rand()  # noqa: NPY002
        built.append(cfg)
        return real_build(cfg)

    monkeypatch.setattr(loop, "_loss", _scaled_by_global_draws(loop._loss))
    monkeypatch.setattr(loop, "build_data_and_model", build_as_a_first_import_does)
    kw = {**TINY_RUN, "data": str(corpus_file), "optimizer": "adamw", "steps": 4, "grad_clip": 0.0}
    for name in ("first", "second"):
        loop.train(TrainConfig(**kw, out_dir=str(tmp_path / name)))
    a, b = (checkpoint.load(tmp_path / d / "ckpt.pt")["model"] for d in ("first", "second"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6  # (1.4e-4 apart before)


def test_a_diverged_run_whose_checkpoints_were_deleted_is_reused_not_retrained(corpus_file, tmp_path, capsys):
    """As a finished one: its summary is the cell's outcome (``compare`` re-runs the command), not a
    run to start over from step 0."""
    pytest.importorskip("transformers")
    import json

    from helpers import TINY_RUN
    from htmuon.train.config import TrainConfig
    from htmuon.train.loop import train

    cfg = TrainConfig(**{**TINY_RUN, "data": str(corpus_file), "out_dir": str(tmp_path / "run")})
    out = tmp_path / "run"
    summary = {**train(cfg), "finished": False, "diverged": True, "steps_done": 4}
    summary["final_val_loss"] = float("inf")
    (out / "summary.json").write_text(json.dumps(summary))
    for name in (checkpoint.CKPT_NAME, checkpoint.PREV_NAME):
        (out / name).unlink()
    metrics = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    again = train(cfg, resume=True)
    assert again["diverged"] and again["steps_done"] == 4
    assert (out / "metrics.jsonl").read_bytes() == metrics and not (out / checkpoint.CKPT_NAME).exists()
    assert "holds a diverged run (summary.json) with no checkpoint left" in capsys.readouterr().err


def test_stale_temp_files_are_found(tmp_path):
    for name in (".ckpt.pt.tmp123", ".metrics.jsonl.tmp9", ".ckpt.pt.tmpX", "ckpt.pt", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    got = [p.name for p in data.stale_temp_files(tmp_path)]
    assert got == [".ckpt.pt.tmp123", ".metrics.jsonl.tmp9"]


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk_for(prefix: str):
    def fake_open(file, mode="r", *args, **kw):
        f = open(file, mode, *args, **kw)
        return _FullDisk(f) if Path(file).name.startswith(prefix) and "w" in mode else f

    return fake_open


def test_disk_full_while_checkpointing_is_one_line(corpus_file, tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from helpers import TINY_RUN, flags

    out = tmp_path / "run"
    monkeypatch.setattr(data, "open", full_disk_for(".ckpt.pt.tmp"), raising=False)
    rc = cli_main(["train", *flags({**TINY_RUN, "data": corpus_file, "out_dir": out})])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err == f"htmuon train: error: cannot write checkpoint '{out / 'ckpt.pt'}': No space left on device"
    assert not (out / "ckpt.pt").exists() and not data.stale_temp_files(out)
