"""The command line: the demo runs on shipped data; user mistakes are one-line errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from htmuon.cli import main


def test_demo_runs(capsys):
    assert main(["demo", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.split() and line.split()[0] in ("adamw", "muon", "htmuon")
    ]
    assert [r[0] for r in rows] == ["adamw", "muon", "htmuon"]
    for r in rows:
        assert 0.0 < float(r[1]) < 2.5  # train loss: loose (HTMuon's raw scale starts slowly)
        # held-out accuracy far above chance (10%): measured 89-94% after one epoch
        assert 60.0 < float(r[2].rstrip("%")) <= 100.0


def test_user_error_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "htmuon", "demo", "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "htmuon demo: error: --epochs must be >= 1, got 0"
    assert "Traceback" not in proc.stderr


@pytest.mark.distributed
def test_a_refused_command_in_a_process_group_ends_the_process_at_once(tmp_path):
    """A command refused after its process joined a torch.distributed group (ranks started with other
    flags) exits 2 with its one line, ending the process at once: the interpreter's shutdown with the
    group's threads alive aborted at times (std::terminate, exit -6; 2 of 25 runs of two refused ranks
    in CI's test). The atexit handler proves the shutdown was skipped; without a group it runs."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    store = tmp_path / "store"
    script = f"""
import atexit, sys
import torch.distributed as dist
from htmuon.cli import main
atexit.register(lambda: print("shutdown ran", flush=True))
if sys.argv[1] == "group":
    dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
sys.exit(main(["demo", "--epochs", "0"]))
"""
    for mode, shutdown in (("group", False), ("none", True)):
        proc = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120
        )
        # (stdout may hold gloo's own lines: torch 2.10 prints "[Gloo] Rank 0 is connected to 0 peer ranks")
        assert (proc.returncode, "shutdown ran" in proc.stdout) == (2, shutdown), proc.stderr[-2000:]
        assert proc.stderr.strip() == "htmuon demo: error: --epochs must be >= 1, got 0"


def test_output_piped_into_a_reader_that_stops_is_not_an_error(tmp_path):
    """`htmuon compare --status | head -1`: the reader goes away; no "error: Broken pipe", no traceback,
    exit 141 as for a command stopped by a closed pipe."""
    read, write = os.pipe()
    os.close(read)  # a reader that has already gone
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "htmuon", "compare", "--optimizers", "muon", "--seeds", "0"]
            + ["--out-dir", str(tmp_path / "g"), "--status"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_a_broken_pipe_that_is_not_stdout_is_still_reported(monkeypatch, capsys):
    import htmuon.demo

    def broken(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(htmuon.demo, "main", broken)
    assert main(["demo"]) == 2  # stdout here is pytest's capture, not a pipe
    assert capsys.readouterr().err.strip() == "htmuon demo: error: Broken pipe"


# ----------------------------------------------------------------------------- user and environment errors
# Each: exit code 2, one line `htmuon COMMAND: error: ...` naming the bad value or file, no traceback.


def one_line_error(capsys, argv: list[str], command: str = "train") -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"htmuon {command}: error: "), err
    return err


def tiny_train(corpus_file, out, **kw) -> list[str]:
    pytest.importorskip("transformers")
    from helpers import TINY_RUN, flags

    return ["train", *flags({**TINY_RUN, "data": corpus_file, "out_dir": out, **kw})]


def test_version(capsys):
    from htmuon import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"htmuon {__version__}"


def test_demo_unknown_method(capsys):
    err = one_line_error(capsys, ["demo", "--epochs", "1", "--method", "nope"], "demo")
    assert "unknown --method 'nope'" in err and "svd" in err


def test_demo_without_scikit_learn_is_one_line_before_any_output(monkeypatch, capsys):
    """The demo printed its header and the table's column names, then the error (scikit-learn was first
    imported inside the first run): now the one line alone, exit 2."""
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--epochs", "1"]) == 2
    out, err = capsys.readouterr()
    assert (
        out == "" and err == "htmuon demo: error: the demo needs scikit-learn: pip install 'htmuon[train]'\n"
    )


def test_out_dir_under_a_file(corpus_file, tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    err = one_line_error(capsys, tiny_train(corpus_file, tmp_path / "f" / "run"))
    assert f"--out-dir '{tmp_path / 'f' / 'run'}' is not a folder ('{tmp_path / 'f'}' is a file)" in err
    err = one_line_error(capsys, tiny_train(corpus_file, tmp_path / "f"))
    assert f"--out-dir '{tmp_path / 'f'}' is not a folder" in err


def test_out_dir_not_writable(corpus_file, tmp_path, capsys, monkeypatch):
    """(os.access stands in for a read-only mount or another user's folder: tests may run as root.)"""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    err = one_line_error(capsys, tiny_train(corpus_file, tmp_path / "run"))
    assert f"--out-dir '{tmp_path / 'run'}': '{tmp_path}' is not writable" in err
    assert not (tmp_path / "run").exists()


def test_read_only_file_system_while_starting_leaves_nothing(corpus_file, tmp_path, capsys, monkeypatch):
    """The writes fail (EROFS, as on a read-only mount): one line naming the file, and the retry is not
    refused as "already holds a run"."""
    from htmuon.train import data

    out = tmp_path / "run"

    def read_only_open(file, mode="r", *args, **kw):
        if "w" in mode and Path(file).name.startswith(".run.json"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return open(file, mode, *args, **kw)

    monkeypatch.setattr(data, "open", read_only_open, raising=False)
    err = one_line_error(capsys, tiny_train(corpus_file, out))
    assert f"cannot write '{out / 'run.json'}': Read-only file system" in err
    assert not out.exists()
    monkeypatch.undo()
    assert main([str(a) for a in tiny_train(corpus_file, out, steps=2)]) == 0


def test_failed_start_without_tensorboard_leaves_nothing(corpus_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    err = one_line_error(capsys, tiny_train(corpus_file, out, tensorboard=True))
    assert "--tensorboard needs the tensorboard package" in err
    assert not out.exists()
    monkeypatch.undo()
    assert main([str(a) for a in tiny_train(corpus_file, out, steps=2)]) == 0


def test_resume_of_a_missing_run_is_an_error(corpus_file, tmp_path, capsys):
    out = tmp_path / "nope"
    err = one_line_error(capsys, [*tiny_train(corpus_file, out), "--resume"])
    assert f"--resume: no run to continue in '{out}' (the folder does not exist)" in err
    assert not out.exists()
    out.mkdir()
    err = one_line_error(capsys, [*tiny_train(corpus_file, out), "--resume"])
    assert "(no config.json or checkpoint there)" in err


@pytest.mark.parametrize("name", ["run.json", "config.json"])
def test_corrupt_run_file_on_resume(name, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_train(corpus_file, out, ckpt_every=0)
    assert main([*map(str, args), "--stop-after", "2" if name == "run.json" else "1"]) == 0
    if name == "config.json":
        (out / "ckpt.pt").unlink()  # killed before its first checkpoint: config.json decides
        (out / "ckpt.prev.pt").unlink(missing_ok=True)
    before = (out / name).read_bytes()
    (out / name).write_bytes(before[: len(before) // 2])
    capsys.readouterr()
    err = one_line_error(capsys, [*args, "--resume"])
    assert f"'{out / name}' is not valid JSON" in err


@pytest.mark.parametrize("edit", ["val.bin", "train.bin", "vocab_size", "val.bin of an older cache"])
def test_changed_token_cache_content_is_refused(edit, corpus_file, tmp_path, capsys, monkeypatch):
    """Bytes changed in a token file (size kept) no longer move the reported loss unnoticed, and a
    vocabulary in meta.json below the tokens' largest id is refused (it was an IndexError traceback).
    The error names the file that changed (each file's digest); a cache without them names both."""
    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "cache"))
    assert main([str(a) for a in tiny_train(corpus_file, tmp_path / "a", steps=2)]) == 0
    (meta,) = (tmp_path / "cache").rglob("meta.json")
    if edit.endswith("older cache"):
        fields = json.loads(meta.read_text())
        del fields["train_digest"], fields["val_digest"]
        meta.write_text(json.dumps(fields))
        raw = bytearray((meta.parent / "val.bin").read_bytes())
        raw[100:140] = bytes(40)
        (meta.parent / "val.bin").write_bytes(bytes(raw))
        path, why = meta.parent / "train.bin", "the tokens in train.bin / val.bin are not those written"
    elif edit == "vocab_size":
        fields = json.loads(meta.read_text())
        fields["vocab_size"] = fields["max_id"]
        meta.write_text(json.dumps(fields))
        path, why = meta, "beyond the vocabulary of"
    else:
        path = meta.parent / edit
        raw = bytearray(path.read_bytes())
        raw[100:140] = bytes(40)  # 20 tokens set to id 0
        path.write_bytes(bytes(raw))
        why = f"the tokens in {edit} are not those written"  # the file that changed, by its own digest
    capsys.readouterr()
    err = one_line_error(capsys, tiny_train(corpus_file, tmp_path / "b", steps=2))
    assert f"token cache file '{path}' is unusable" in err and why in err, err


@pytest.mark.parametrize("victim", ["meta.json", "train.bin", "val.bin"])
def test_corrupt_token_cache_names_the_file(victim, corpus_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "cache"))
    assert main([str(a) for a in tiny_train(corpus_file, tmp_path / "a", steps=2)]) == 0
    (path,) = (tmp_path / "cache").rglob(victim)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    capsys.readouterr()
    err = one_line_error(capsys, tiny_train(corpus_file, tmp_path / "b", steps=2))
    assert f"token cache file '{path}' is unusable" in err and "to rebuild it" in err


def test_train_refuses_flags_its_optimizer_ignores(capsys, tmp_path):
    """``htmuon train --optimizer adamw --p 0.5`` trained plain AdamW, the flag silently ignored (as
    were --method, --momentum, ... for every optimizer outside the HTMuon family, and --adamw-lr for
    those with one lr); a one-line error naming the flags now, before anything is built."""
    out = tmp_path / "run"
    for argv, msg in (
        (["--optimizer", "adamw", "--p", "0.5"], "--p: optimizer 'adamw' does not use it (not of the HTMuon"),
        (["--optimizer", "soap", "--method", "svd", "--momentum", "0.9"],
         "--method, --momentum: optimizer 'soap'"),
        (["--optimizer", "cadamw", "--adamw-lr", "0.01"],
         "--adamw-lr: optimizer 'cadamw' does not use it (one lr"),
        (["--optimizer", "galore", "--adamw-beta2", "0.99"],
         "--adamw-beta2: optimizer 'galore' does not use it (its betas are its own)"),
    ):  # fmt: skip
        assert main(["train", "--preset", "smoke", "--out-dir", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_config_file_keys_its_optimizer_ignores_are_named(capsys, tmp_path):
    """``--config f.json`` with ``{"optimizer": "adamw", "p": 0.5}`` trained AdamW with p silently
    ignored (and config.json recorded p 0.5). A file is not refused, as flags are: a run's saved
    config.json holds every key and is a config file too; the keys set away from their defaults are
    named in a note."""
    from htmuon.train.cli import note_ignored_file_keys
    from htmuon.train.config import make_config, to_dict
    from htmuon.train.optimizers import resolve

    f = tmp_path / "f.json"
    f.write_text(json.dumps({"optimizer": "adamw", "p": 0.5, "method": "svd", "momentum": 0.95}))
    note_ignored_file_keys(make_config(None, str(f)), str(f))
    err = capsys.readouterr().err
    assert f"note: p=0.5, method='svd' in '{f}': optimizer 'adamw' does not use it" in err, err
    for optimizer, reused_as, noted in (
        ("adamw", "adamw", False),
        ("htmuon", "adamw", True),
        ("htmuon", "htmuon", False),
    ):
        saved = tmp_path / f"{optimizer}.json"  # a run's config.json: every key, resolved
        saved.write_text(json.dumps(to_dict(resolve(make_config(None, None, {"optimizer": optimizer})))))
        note_ignored_file_keys(make_config(None, str(saved), {"optimizer": reused_as}), str(saved))
        assert ("does not use it" in capsys.readouterr().err) == noted, (optimizer, reused_as)


# ----------------------------------------------------------------------------- options reach the work


def test_demo_passes_its_options_to_every_run(monkeypatch, capsys):
    import htmuon.demo

    calls = []
    result = {"train_loss": 0.5, "test_acc": 0.9, "seconds": 0.0}
    monkeypatch.setattr(htmuon.demo, "run_one", lambda *a: calls.append(a) or result)
    assert main(["demo", "--epochs", "2", "--seed", "3", "--method", "svd"]) == 0
    assert calls == [(name, 3, 2, "svd") for name in ("adamw", "muon", "htmuon")]
    assert "2 epochs, seed 3" in capsys.readouterr().out


def test_demo_says_whether_auto_chose_the_backend_or_method_forced_it(monkeypatch, capsys):
    """`--method eigh` printed "method 'eigh' (eigh on this CPU)", as if auto had chosen it."""
    import htmuon.demo
    from htmuon.spectral import resolve_method

    result = {"train_loss": 0.5, "test_acc": 0.9, "seconds": 0.0}
    monkeypatch.setattr(htmuon.demo, "run_one", lambda *a: result)
    assert main(["demo", "--method", "eigh"]) == 0
    assert "htmuon: method 'eigh' (forced by --method)" in capsys.readouterr().out
    assert main(["demo"]) == 0
    auto = resolve_method("auto", "power", "cpu")
    assert f"htmuon: method 'auto' ({auto} on this CPU)" in capsys.readouterr().out


def test_demo_sets_torchs_threads_before_training(monkeypatch, capsys):
    """--threads defaults to 1 (torch's default thread count made the demo ~10x slower on a busy 2-core
    machine, and its numbers changed with the count); 0 keeps torch's default, as htmuon train's."""
    import torch

    import htmuon.demo
    from htmuon.cli import build_parser

    assert build_parser().parse_args(["demo"]).threads == 1
    events = []
    result = {"train_loss": 0.5, "test_acc": 0.9, "seconds": 0.0}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: events.append(("threads", n)))
    monkeypatch.setattr(htmuon.demo, "run_one", lambda name, *a: events.append(name) or result)
    assert main(["demo"]) == 0
    assert events == [("threads", 1), "adamw", "muon", "htmuon"]
    events.clear()
    assert main(["demo", "--threads", "3"]) == 0
    assert events[0] == ("threads", 3)
    events.clear()
    assert main(["demo", "--threads", "0"]) == 0
    assert events == ["adamw", "muon", "htmuon"]  # torch's default, untouched
    capsys.readouterr()
    err = one_line_error(capsys, ["demo", "--threads", "-1"], "demo")
    assert "--threads must be >= 0 (0 = torch's default), got -1" in err


def test_demo_runs_muon_as_p0_ns_and_htmuon_as_asked_from_the_seeds_init(monkeypatch):
    """Muon is HTMuon(p=0, method="ns") whatever --method says; HTMuon gets p = 0.125 and --method;
    the model's initialisation and the batches' order follow the seed."""
    import torch

    import htmuon
    from htmuon.demo import run_one

    class Built(Exception):
        pass

    seen = []

    def fake_htmuon(groups, **kw):
        seen.append((kw["p"], kw["method"], groups[0]["params"][0].detach().clone()))
        raise Built

    monkeypatch.setattr(htmuon, "HTMuon", fake_htmuon)
    for name, seed in (("muon", 1), ("htmuon", 1), ("muon", 2)):
        with pytest.raises(Built):
            run_one(name, seed, 1, "svd")
    (p_m, method_m, init_1), (p_h, method_h, init_h), (_, _, init_2) = seen
    assert (p_m, method_m, p_h, method_h) == (0.0, "ns", 0.125, "svd")
    assert torch.equal(init_1, init_h) and not torch.equal(init_1, init_2)
    monkeypatch.undo()

    seeds = []
    real_randperm = torch.randperm

    def spy_randperm(n, *a, generator=None, **kw):
        seeds.append(generator.initial_seed())
        return real_randperm(n, *a, generator=generator, **kw)

    monkeypatch.setattr(torch, "randperm", spy_randperm)
    run_one("adamw", 5, 2)
    assert seeds == [5, 5, 5]  # the split and each of the 2 epochs' shuffles


def test_keyboard_interrupt_exits_130_with_one_line(monkeypatch, capsys):
    import htmuon.demo

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(htmuon.demo, "main", interrupted)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "htmuon demo: interrupted\n"


def test_signal_exit_codes_are_128_plus_the_signal():
    from htmuon.errors import signal_exit_code

    assert signal_exit_code("SIGTERM") == 143 and signal_exit_code("SIGINT") == 130
    assert signal_exit_code("") == 143  # a signal that came to another rank: SIGTERM's


def _fake_train(monkeypatch, summary: dict, rank: int = 0) -> list[dict]:
    """``htmuon.train.loop.train`` replaced by one that records its arguments and returns ``summary``."""
    import htmuon.torchrun
    import htmuon.train.loop

    calls = []

    def train(cfg, **kw):
        calls.append(dict(kw, cfg=cfg))
        return {"stopped": False, "diverged": False, "steps_done": 3, "run_dir": "runs/x", **summary}

    monkeypatch.setattr(htmuon.train.loop, "train", train)
    monkeypatch.setattr(htmuon.torchrun, "finish", lambda: rank)
    return calls


def test_train_passes_the_presets_lrs_and_its_flags_on(monkeypatch, capsys, tmp_path):
    from htmuon.train.presets import RUN_PRESETS

    done = dict(optimizer="muon", lr=0.02, seed=0, final_val_loss=3.0, final_val_ppl=20.0)
    calls = _fake_train(monkeypatch, done)
    argv = ["train", "--preset", "smoke", "--out-dir", str(tmp_path / "r"), "--stop-after", "2", "--resume"]
    assert main(argv) == 0
    (call,) = calls
    assert call["preset_lrs"] == RUN_PRESETS["smoke"].lrs and call["preset_lrs"]
    assert call["preset_adamw_lrs"] == RUN_PRESETS["smoke"].adamw_lrs and call["preset_adamw_lrs"]
    assert call["stop_after"] == 2 and call["resume"] == "required"
    assert "done: muon lr 0.02 seed 0: val loss 3.0000, val ppl 20.000" in capsys.readouterr().out


def test_train_stop_after_zero_is_refused_before_training(monkeypatch, capsys, tmp_path):
    calls = _fake_train(monkeypatch, {})
    argv = ["train", "--preset", "smoke", "--out-dir", tmp_path / "r", "--stop-after", 0]
    err = one_line_error(capsys, argv)
    assert err.endswith("--stop-after must be >= 1, got 0") and calls == []


def test_train_exit_codes_of_a_diverged_and_a_signalled_run(monkeypatch, capsys, tmp_path):
    argv = ["train", "--preset", "smoke", "--out-dir", str(tmp_path / "r")]
    _fake_train(monkeypatch, {"diverged": True, "diverged_why": "non-finite loss"})
    assert main(argv) == 1
    assert capsys.readouterr().err == "diverged (non-finite loss) at step 3: runs/x\n"
    signalled = {"stopped": True, "signal": "SIGINT"}
    _fake_train(monkeypatch, signalled, rank=1)  # under torchrun, a rank other than 0: no message
    assert main(argv) == 130 and capsys.readouterr().err == ""
    _fake_train(monkeypatch, signalled, rank=0)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("htmuon train: stopped by SIGINT after step 3, with a checkpoint"), err


def test_adamw_lr_is_taken_by_every_optimizer_with_an_adamw_part():
    from htmuon.train.cli import check_used_keys
    from htmuon.train.optimizers import NO_ADAMW_PART, OPTIMIZERS

    for name in OPTIMIZERS:
        if name not in NO_ADAMW_PART:
            check_used_keys(name, ["adamw_lr"], flags=True)  # mars, cosmos: outside the HTMuon family
