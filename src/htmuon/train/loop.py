"""The training loop: one run from a config, resumable exactly.

    lr(step) = peak * lr_factor(step)         linear warmup, cosine decay to min_lr_ratio x peak
    loss     = mean over grad_accum micro-batches (bf16 autocast on a bf16 GPU)
    clip the global gradient norm, optimizer.step()
    every eval_every steps: validation loss (+ perplexity / accuracy) on eval_batches of the held-out
        split, a window that moves on at every evaluation (evaluation k reads window k, wrapping)
    at the end: validation on final_eval_batches (default: the whole held-out split)
    warmup: warmup_fraction x steps when set (the paper's 10%), else warmup_steps
    weight decay: torch's lr x wd per step (wd_mode "lr"), or wd x schedule ("independent")
    every ckpt_every steps: an atomic checkpoint that a killed run resumes from bit-exactly
    SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C): the step finishes, a checkpoint is written,
        the run returns stopped (to a lone process, a second signal acts at once)
    every alpha_every steps (if set): the weights' mean layer-wise power-law alpha ("alpha" records)

A run folder holds config.json, run.json (versions, seed, command), metrics.jsonl,
metrics.csv, ckpt.pt and ckpt.prev.pt (the checkpoint before), tb/ (with tensorboard) and, once
finished or diverged, summary.json. An error of the user or the environment (an unwritable run
folder, a full disk, a corrupt file, a hung rank) is a one-line ``UserError`` naming the file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from htmuon import torchrun
from htmuon.cli import UserError
from htmuon.train import checkpoint
from htmuon.train.config import TrainConfig, from_dict, identity_diff, to_dict, warmup_for
from htmuon.train.data import atomic_write_bytes, stale_temp_files
from htmuon.train.locks import acquire_lock, describe_owner, release_lock
from htmuon.train.models import check_model_name, count_parameters
from htmuon.train.optimizers import backend_label, build_optimizer, check_optimizer_name, resolve
from htmuon.train.presets import model_task

METRIC_COLUMNS = [
    "step",
    "kind",
    "loss",
    "ppl",
    "acc",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "step_ms",
    "elapsed_s",
    "mean_alpha",
]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (1-based): linear warmup, then cosine to ``min_ratio``."""
    if warmup > 0 and step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def budget_steps(cfg: TrainConfig) -> int:
    """Steps for a ``tokens_per_param`` budget: ceil(tokens_per_param x parameters / tokens per step).

    The parameters are counted on a model built on the meta device with the configured vocabulary."""
    if model_task(cfg.model) == "lm":
        from htmuon.train.models import build_lm

        with torch.device("meta"):
            n_params = count_parameters(build_lm(cfg.model, cfg.vocab_size, cfg.seq_len))
        per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    else:
        raise UserError(f"tokens_per_param is for language models; model '{cfg.model}' is an image model")
    return max(1, math.ceil(cfg.tokens_per_param * n_params / per_step))


def schedule_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the budget (``tokens_per_param``) and the warmup (``warmup_fraction``) into steps/warmup_steps."""
    if cfg.tokens_per_param > 0:
        cfg = dataclasses.replace(cfg, steps=budget_steps(cfg))
    if cfg.warmup_fraction is not None:
        cfg = dataclasses.replace(cfg, warmup_steps=warmup_for(cfg.warmup_fraction, cfg.steps))
    if cfg.warmup_steps > cfg.steps:
        raise UserError(f"warmup_steps ({cfg.warmup_steps}) must not exceed steps ({cfg.steps})")
    return cfg


def independent_weight_decay(opt: torch.optim.Optimizer) -> None:
    """wd_mode "independent": divide each group's weight decay by its peak lr, once, before training.

    torch's optimizers (and HTMuon) decay by lr x wd per step; with lr = peak x schedule(t) the
    per-step decay becomes wd x schedule(t), whatever the peak lr. Saved in the optimizer state,
    so a resumed run keeps it."""
    for g in opt.param_groups:
        if g.get("weight_decay"):
            g["weight_decay"] = g["weight_decay"] / g["lr"]


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    out["torch"] = str(torch.__version__)
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return out
    for pkg in ("htmuon", "transformers", "tokenizers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    if out.get("htmuon") is None:
        try:
            import htmuon

            out["htmuon"] = getattr(htmuon, "__version__", None)
        except ImportError:
            pass
    return out


def resolve_config(
    cfg: TrainConfig,
    preset_lrs: dict[str, float] | None = None,
    preset_adamw_lrs: dict[str, float] | None = None,
) -> TrainConfig:
    """Check the names and fill every 'auto'/None field that decides what runs."""
    check_model_name(cfg.model)
    check_optimizer_name(cfg.optimizer)
    task = model_task(cfg.model)
    data = cfg.data
    if data == "auto":
        data = "shakespeare" if task == "lm" else "digits"
    from htmuon.train.data import IMAGE_SOURCES

    is_image_source = data.partition(":")[0] in IMAGE_SOURCES
    if task == "lm" and is_image_source:
        raise UserError(f"model '{cfg.model}' is a language model; data '{data}' is an image dataset")
    if task == "image" and not is_image_source:
        raise UserError(
            f"model '{cfg.model}' is an image classifier; use --data digits, cifar10:DIR, cifar100:DIR or "
            "imagenet:DIR"
        )
    cfg = schedule_config(resolve(dataclasses.replace(cfg, data=data), preset_lrs, preset_adamw_lrs))
    if cfg.out_dir == "auto":
        cfg = dataclasses.replace(cfg, out_dir=f"runs/{cfg.model}-{cfg.optimizer}-seed{cfg.seed}")
    return cfg


def set_threads(threads: int) -> None:
    """torch's CPU threads, as the ``threads`` config key means: N > 0 sets N, 0 keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)


def pick_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype | None]:
    if cfg.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise UserError(f"unknown device '{cfg.device}' (auto, cpu, cuda, cuda:N)") from None
        if dev.type not in ("cpu", "cuda"):
            raise UserError(f"device '{cfg.device}' is not supported for training (auto, cpu, cuda, cuda:N)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device '{cfg.device}' requested but CUDA is not available")
    if cfg.dtype == "fp32":
        amp = None
    elif cfg.dtype == "bf16":
        amp = torch.bfloat16
    else:
        amp = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return dev, amp


def build_data_and_model(cfg: TrainConfig):
    """(data, model, info) for a resolved config; the model is initialised from torch's RNG."""
    from htmuon.train.models import build_image_model, build_lm

    if model_task(cfg.model) == "lm":
        from htmuon.train.data import load_token_data

        data, vocab_size, info = load_token_data(cfg)  # streamed into a memmapped token cache
        torch.manual_seed(cfg.seed)
        model = build_lm(cfg.model, vocab_size, cfg.seq_len)
    else:
        from htmuon.train.data import load_image_data

        data = load_image_data(cfg.data, cfg.batch_size, cfg.seed)
        torch.manual_seed(cfg.seed)
        model = build_image_model(cfg.model, data.in_channels, data.num_classes, data.image_size)
        info = {"train_samples": data.n_train, "val_samples": data.n_val, "classes": data.num_classes}
    info["parameters"] = count_parameters(model)
    return data, model, info


def _loss(model, task: str, x, y):
    if task == "lm":
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)), None
    logits = model(x)
    return F.cross_entropy(logits.float(), y), logits


@torch.no_grad()
def evaluate(model, data, task: str, device, amp, max_batches: int, window: int = 0) -> dict:
    """Validation loss (+ ppl / accuracy) on ``max_batches`` of window ``window`` (0 batches: all)."""
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    for x, y in data.val_batches(max_batches, window):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, logits = _loss(model, task, x, y)
        k = y.numel()
        total += float(loss) * k
        n += k
        if logits is not None:
            correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    loss = total / max(n, 1)
    out = {"loss": loss}
    if task == "lm":
        out["ppl"] = math.exp(min(loss, 50.0))
    else:
        out["acc"] = correct / max(n, 1)
    return out


class Metrics:
    """metrics.jsonl + metrics.csv (+ TensorBoard); on resume, records after the checkpoint go."""

    def __init__(self, out: Path, keep_until_step: int | None, tensorboard: bool):
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"
        self._fj = self._fc = self.tb = None
        kept = []
        if keep_until_step is not None and self.jsonl.exists():
            damaged: list[int] = []
            kept = [r for r in read_metrics(self.jsonl, damaged) if r["step"] <= keep_until_step]
            if damaged:
                lines = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
                print(
                    f"htmuon: '{self.jsonl}': {len(damaged)} damaged line(s) dropped (line {lines})",
                    file=sys.stderr,
                    flush=True,
                )
        elif keep_until_step:  # deleted or lost: the run goes on, its records before the checkpoint are gone
            print(
                f"htmuon: no '{self.jsonl}' (deleted?): the records of steps 1-{keep_until_step} are lost; "
                f"it goes on from step {keep_until_step + 1}",
                file=sys.stderr,
                flush=True,
            )
        self.records = kept
        write_run_file(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        with _file_errors(self.csv):
            with open(self.csv, "w", newline="") as f:
                w = csv.DictWriter(f, METRIC_COLUMNS)
                w.writeheader()
                w.writerows(kept)
            self._fj = open(self.jsonl, "a")
            self._fc = open(self.csv, "a", newline="")
        self._w = csv.DictWriter(self._fc, METRIC_COLUMNS)
        if tensorboard:
            SummaryWriter = require_tensorboard()
            # events of the steps a resume undoes (after the checkpoint; all of them for a run started
            # over) are hidden, as those records are dropped from metrics.jsonl
            tb = out / "tb"
            purge = (keep_until_step or 0) + 1 if tb.exists() else None
            with _file_errors(tb):
                self.tb = SummaryWriter(str(tb), purge_step=purge)

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        with _file_errors(self.jsonl):
            self._fj.write(json.dumps(rec) + "\n")
            self._fj.flush()
        with _file_errors(self.csv):
            self._w.writerow(rec)
            self._fc.flush()
        if self.tb is not None:
            for k in ("loss", "ppl", "acc", "lr", "grad_norm", "tokens_per_s", "mean_alpha"):
                if k in rec:
                    self.tb.add_scalar(f"{rec['kind']}/{k}", rec[k], rec["step"])

    def sync(self) -> None:
        """fsync both files: called before each checkpoint is written (and fsynced), so that after a power
        loss or an OS crash the checkpoint never holds a later step than the records (the resumed run
        would have a gap in them). TensorBoard's events are flushed (it buffers up to two minutes: a
        kill after the checkpoint lost them, a gap in its curves after the resume)."""
        for path, f in ((self.jsonl, self._fj), (self.csv, self._fc)):
            with _file_errors(path):
                os.fsync(f.fileno())
        if self.tb is not None:
            with _file_errors(self.jsonl.parent / "tb"):
                self.tb.flush()

    def close(self) -> None:
        for f in (self._fj, self._fc, self.tb):
            if f is not None:
                try:
                    f.close()
                except OSError:  # a full disk: the write that failed already reported it
                    pass


def require_tensorboard():
    """torch's ``SummaryWriter``, or a UserError where the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


@contextmanager
def _file_errors(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` (disk full, read-only, no permission) into a UserError naming ``path``."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write '{path}': {e.strerror or e}") from None


def write_run_file(path: Path, text: str) -> None:
    """Atomically write a text file of the run folder; a UserError naming it if that fails."""
    with _file_errors(path):
        atomic_write_bytes(path, text.encode())


def read_json(path: Path, what: str) -> dict:
    """A JSON object from the run folder, or a UserError naming the file (``what``: its role)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read ({e.strerror or e}); nothing changed") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else f"not UTF-8: {e.reason}"
        raise UserError(
            f"{what} '{path}' is not valid JSON ({why}); fix or delete it; nothing changed"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} '{path}' is not a JSON object; fix or delete it; nothing changed")
    return obj


def check_out_dir(out: Path) -> None:
    """A UserError unless the run folder ``out`` exists as a writable folder or can be created."""
    probe = out
    while not probe.exists() and probe.parent != probe:  # the nearest existing ancestor
        if probe.is_symlink():  # (mkdir would say "File exists", and the run lock could not be made)
            raise UserError(
                f"--out-dir '{out}': '{probe}' is a link to '{os.readlink(probe)}', which does not exist"
            )
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == out else f" ('{probe}' is a file)"
        raise UserError(f"--out-dir '{out}' is not a folder{where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        ro = os.statvfs(probe).f_flag & os.ST_RDONLY if hasattr(os, "statvfs") else 0
        why = "on a read-only file system" if ro else "not writable"
        raise UserError(f"--out-dir '{out}': '{probe}' is {why}")


class _NoMetrics:
    """Metrics on ranks other than 0 under torchrun: kept in memory, never written."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, rec: dict) -> None:
        self.records.append(rec)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _is_record(r: object) -> bool:
    """A metrics record as the loop writes it (a damaged line may still be valid JSON: a number, a
    record without its step, a mangled key); others are dropped like a torn line."""
    if not (isinstance(r, dict) and type(r.get("step")) is int and r.keys() <= _METRIC_KEYS):
        return False
    return "loss" in r if r.get("kind") in ("train", "val") else r.get("kind") == "alpha"


_METRIC_KEYS = frozenset(METRIC_COLUMNS)


def read_metrics(path: Path, damaged: list[int] | None = None) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not one is dropped: the last line torn by a kill,
    or a damaged one, whose number (1-based) is appended to ``damaged`` when given."""
    out, bad, n = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:  # garbage bytes: a line that is dropped
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill: drop it
                    r = None
                if _is_record(r):
                    out.append(r)
                else:
                    bad.append(n)
    if damaged is not None:
        damaged += bad[:-1] if bad and bad[-1] == n else bad  # (a kill tears the last line only)
    return out


class _Progress:
    def __init__(self, mode: str, total: int, start: int, label: str, unit: str = "tok/s"):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.label, self.bar, self.unit = mode, label, None, unit
        if mode == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.mode = "log"
            else:
                self.bar = tqdm(total=total, initial=start, desc=label, dynamic_ncols=True, leave=True)

    def update(self, step: int, total: int, loss: float, tps: float, log: bool, val: dict | None) -> None:
        if self.bar is not None:
            post = {"loss": f"{loss:.3f}", self.unit: f"{tps:,.0f}"}
            if val:
                post["val"] = f"{val['loss']:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.mode == "log" and (log or val):
            msg = f"{self.label} step {step}/{total} | loss {loss:.4f} | {tps:,.0f} {self.unit}"
            if val:
                extra = f" ppl {val['ppl']:.2f}" if "ppl" in val else f" acc {val['acc']:.4f}"
                msg += f" | val {val['loss']:.4f}{extra}"
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def mean_alpha(model) -> float | None:
    """Mean layer-wise power-law alpha (htmuon.diagnostics), or None where it is not installed."""
    try:
        from htmuon.diagnostics import analyze
    except ImportError:
        return None
    return float(analyze(model, fit="ks").mean_alpha)


def _check_same_run(saved: TrainConfig, cfg: TrainConfig, where: str) -> None:
    """UserError naming up to four differing keys unless ``saved`` and ``cfg`` describe the same run."""
    diff = identity_diff(saved, cfg)
    if diff:
        what = ", ".join(f"{k}={getattr(saved, k)!r} vs {getattr(cfg, k)!r}" for k in diff[:4])
        # lrs and the clipping norm the run did not set come from the preset, whose values may have
        # changed since (the quick presets' AdamW-part lr did in session 25, the GPU presets' clipping
        # in session 32): say how to continue the run as it started
        # (only when they are all that differs: another optimizer has another default lr too)
        keep = " ".join(f"--{k.replace('_', '-')} {getattr(saved, k)!r}" for k in diff)
        only_lrs = set(diff) <= {"lr", "adamw_lr", "grad_clip"}
        hint = f" (to continue it as it started, pass {keep})" if only_lrs else ""
        raise UserError(f"{where} another config ({what}); nothing changed{hint}")


def train(
    cfg: TrainConfig,
    *,
    resume: bool | str = False,
    stop_after: int | None = None,
    preset_lrs: dict[str, float] | None = None,
    argv: list[str] | None = None,
    preset_adamw_lrs: dict[str, float] | None = None,
) -> dict:
    """Run (or resume) one training run; returns the summary dict (also in summary.json).

    Args:
        cfg: the run's config (``auto`` fields are resolved here).
        resume: False: start a new run (refused if ``out_dir`` holds one); True: continue the run
            in ``out_dir`` from its newest usable checkpoint, or start it if there is none (what
            ``htmuon compare`` does per cell); ``"required"``: continue, and refuse when ``out_dir``
            holds no run (``htmuon train --resume``).
        stop_after: write a checkpoint after this step and return, as if the run were killed
            there (``summary["stopped"]`` is True); resume it later with ``resume=True``.
            SIGTERM or SIGINT while training does the same after the current step (see
            :class:`StopOnSignal`); the returned summary then names it (``summary["signal"]``, also
            when the signal came too late to stop the run and it finished; not saved in
            summary.json, which a later call reuses).
        preset_lrs: the preset's per-optimizer learning rates (used when ``cfg.lr`` is None).
        preset_adamw_lrs: the preset's per-optimizer AdamW-part lrs (when ``cfg.adamw_lr`` is None).
        argv: the command line, recorded in run.json.

    Raises:
        UserError: bad config, an unusable run folder or file, or (under torchrun) a rank that hung
            or died (after the collective timeout, ``HTMUON_DIST_TIMEOUT``).
    """
    if resume not in (False, True, "required"):
        raise ValueError(f"resume must be False, True or 'required', got {resume!r}")
    cfg = resolve_config(cfg, preset_lrs, preset_adamw_lrs)
    device, amp = pick_device(cfg)
    try:  # under torchrun: join the process group (every rank runs this function)
        par = torchrun.from_env(cfg.parallel, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    with torchrun.collective_errors(par):  # a hung or dead peer: one line on every rank, not a hang
        # ranks started with other flags, config files or data would train on other batches or leave a
        # collective unmatched (a "hung" peer after the timeout): refused on every rank, naming the keys
        torchrun.check_same({k: v for k, v in to_dict(cfg).items() if k != "progress"}, par, "configs")
        return _train(cfg, par, device, amp, resume, stop_after, argv)


#: The lock a training run holds on its folder (htmuon.train.locks): a second process that would train
#: or resume the same folder is refused instead of both writing it.
RUN_LOCK_NAME = "run.lock"


class _RunFolderLock:
    """``run.lock`` in a run folder (the main process only), taken before anything in the folder is read,
    built for or written: :meth:`take` creates the folder if it does not exist, and :meth:`release`
    removes a folder that it created if the run left it empty (a start that failed), so a failed start
    leaves nothing behind."""

    def __init__(self, out: Path, active: bool):
        self.path, self.active, self.held = out / RUN_LOCK_NAME, active, False
        self.made: list[Path] = []  # the folders take() made, the run folder first, then its new parents

    def take(self) -> None:
        if not self.active or self.held:
            return
        out = self.path.parent
        for _ in range(3):
            if not out.exists():
                with _file_errors(out):
                    new = [out]
                    while not new[-1].parent.exists():
                        new.append(new[-1].parent)
                    try:
                        out.mkdir(parents=True)
                        self.made = new
                    except FileExistsError:
                        pass  # made by another process just now
            try:
                self.held = acquire_lock(self.path)
            except FileNotFoundError:
                continue  # removed in between by a process whose start failed: make it again
            except OSError as e:
                raise UserError(f"cannot write '{self.path}': {e.strerror or e}") from None
            if not self.held:
                raise UserError(
                    f"run folder '{out}' is in use by another training process: lock "
                    f"{describe_owner(self.path)}; wait for it to finish or stop it"
                )
            return
        raise UserError(f"cannot make run folder '{out}': it keeps being removed")

    def release(self) -> None:
        if self.held:
            release_lock(self.path)
            self.held = False
        for folder in self.made:  # the run folder, then the parents made for it, while empty
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote there (or another process uses it), kept
        self.made = []


def _train(cfg, par, device, amp, resume, stop_after, argv) -> dict:
    if cfg.batch_size % par.world:
        raise UserError(f"batch_size {cfg.batch_size} does not divide among {par.world} processes")
    if cfg.tensorboard:
        require_tensorboard()  # before anything is written, so a failed start leaves nothing behind
    out = Path(cfg.out_dir).expanduser()
    check_out_dir(out)  # before any work: a run folder under a file, read-only or not writable
    if resume == "required" and not out.exists():  # refused before the folder is made for the lock
        raise UserError(_nothing_to_resume(out, "the folder does not exist"))
    lock = _RunFolderLock(out, par.is_main)
    try:
        # before anything in the folder is read, built for or written: a second process on the same
        # folder fails here, before it touches the first one's files
        lock.take()
        return _train_locked(cfg, par, device, amp, resume, stop_after, argv, out, lock)
    finally:
        lock.release()


def _nothing_to_resume(out: Path, why: str) -> str:
    return f"--resume: no run to continue in '{out}' ({why}); drop --resume to start one"


def _train_locked(cfg, par, device, amp, resume, stop_after, argv, out: Path, lock: _RunFolderLock) -> dict:
    ckpt_path = out / checkpoint.CKPT_NAME
    holds_run = any((out / n).exists() for n in ("config.json", checkpoint.CKPT_NAME, checkpoint.PREV_NAME))
    if resume == "required" and not holds_run:
        why = "the folder does not exist" if not out.exists() else "no config.json or checkpoint there"
        raise UserError(_nothing_to_resume(out, why))
    payload, notes, fell_back = None, [], False
    if resume:
        payload, used, notes = checkpoint.load_latest(out)
    if payload is not None:
        # ckpt.pt is damaged (or not a file): set aside below
        fell_back = used.name == checkpoint.PREV_NAME and (ckpt_path.exists() or ckpt_path.is_symlink())
        saved = from_dict(payload["config"], where=f" in checkpoint {used}")
        _check_same_run(saved, cfg, f"checkpoint '{used}' was written by")
    elif resume and (out / "config.json").exists():
        # killed before its first checkpoint: start over, but only if it is the same run
        saved = from_dict(read_json(out / "config.json", "run config"), where=f" in {out / 'config.json'}")
        _check_same_run(saved, cfg, f"run folder '{out}' holds a run of")
        if (out / "summary.json").exists():  # a finished run whose checkpoints were deleted (disk space)
            summary = read_json(out / "summary.json", "run summary")
            if summary.get("finished") or summary.get("diverged"):
                if par.is_main:
                    print(
                        f"htmuon: '{out}' holds a {'diverged' if summary.get('diverged') else 'finished'} "
                        "run (summary.json) with no checkpoint left: "
                        "reusing its summary, not training it again",
                        file=sys.stderr,
                        flush=True,
                    )
                return summary
        metrics_path = out / "metrics.jsonl"
        records = read_metrics(metrics_path) if metrics_path.is_file() else []
        logged = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)
        if logged and par.is_main:
            print(
                f"htmuon: '{out}' has no checkpoint (ckpt.pt, ckpt.prev.pt) although its run logged "
                f"{logged} step(s): starting it over from step 0",
                file=sys.stderr,
                flush=True,
            )
    elif not resume and holds_run:
        raise UserError(
            f"run folder '{out}' already holds a run; pass --resume to continue it or pick another --out-dir"
        )
    if payload is not None and (out / "summary.json").exists():
        summary = read_json(out / "summary.json", "run summary")
        if payload["step"] >= cfg.steps:
            if resume == "required" and par.is_main:  # (`compare`'s own line says it reuses the cell)
                print(
                    f"htmuon: '{out}' holds a finished run (step {payload['step']} of {cfg.steps}): "
                    "reusing its summary, nothing to train",
                    file=sys.stderr,
                    flush=True,
                )
            return summary
        if summary.get("diverged") and summary.get("steps_done", 0) > payload["step"]:
            # it diverged after its last checkpoint: resuming would re-run the same steps to the same end
            if par.is_main:
                done = summary["steps_done"]
                print(
                    f"htmuon: '{out}' holds a run that diverged at step {done} (summary.json): reusing "
                    f"its summary, not running steps {payload['step'] + 1}-{done} again "
                    "(delete summary.json to resume it from its checkpoint)",
                    file=sys.stderr,
                    flush=True,
                )
            return summary
    old_run_info, config_note = None, None
    if payload is not None and (out / "run.json").exists():
        old_run_info = read_json(out / "run.json", "run record")
    if payload is not None:  # config.json deleted, damaged or edited: written again from this (same) config
        path = out / "config.json"
        try:
            on_disk = from_dict(read_json(path, "run config"), where=f" in {path}")
        except UserError as e:
            config_note = f"{str(e).partition(';')[0]}: written again from the checkpoint's config"
        else:  # edited since the run started (the run goes on as its checkpoint says, whatever it holds)
            edited = identity_diff(on_disk, saved)
            if edited:
                what = ", ".join(f"{k}={getattr(on_disk, k)!r} vs {getattr(saved, k)!r}" for k in edited[:4])
                config_note = (
                    f"run config '{path}' differs from its checkpoint's ({what}): the run goes on as it "
                    "started; written again from the checkpoint's config"
                )
    # every rank has checked the run folder before rank 0 writes to it, and continues from the same
    # checkpoint (a folder that is not on a file system every rank shares can differ)
    start_step = payload["step"] if payload is not None else None
    torchrun.check_same(
        {"checkpoint step": start_step},
        par,
        "run folders",
        "put the run folder where every rank reads the same files",
    )
    if par.is_main:
        for note in notes:
            print(f"htmuon: {note}", file=sys.stderr, flush=True)
        if fell_back:
            with _file_errors(ckpt_path):
                bad = checkpoint.set_aside_corrupt(out)
            print(f"htmuon: the damaged checkpoint is kept as '{bad}'", file=sys.stderr, flush=True)
        for stale in stale_temp_files(out):  # left by writes that a kill interrupted
            stale.unlink(missing_ok=True)

    set_threads(cfg.threads)
    if device.type == "cuda" and par.world > 1:
        device = torch.device("cuda", par.local_rank)
    task = model_task(cfg.model)
    with torchrun.main_first(par):  # rank 0 fills the token cache, the others read it
        data, model, info = build_data_and_model(cfg)
    # after the build: the model library's first import in a process can draw from Python's RNG
    # (transformers 4.57 imports sklearn, which imports rich: getrandbits(24)), so that seeding before
    # it gave the first run in a process other draws than the next (measured with torch 2.4.1's venv)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)  # noqa: NPY002 (seed the legacy global RNG for user code)
    if payload is not None:  # the checkpoint's record of its data (run.json's, before it had one)
        _check_same_data(payload.get("data") or (old_run_info or {}).get("data") or {}, info, cfg, out)
    model.to(device)
    model.train()
    module = torchrun.wrap_model(model, par, device)  # DDP / FSDP2 under torchrun, else model
    opt = build_optimizer(model, cfg, process_group=par.process_group)
    if cfg.wd_mode == "independent":
        independent_weight_decay(opt)
    base_lrs = [g["lr"] for g in opt.param_groups]
    params = [p for p in model.parameters() if p.requires_grad]

    start, elapsed, wall, step_times = 0, 0.0, 0.0, []
    if payload is not None:
        built = [g.get("chunk_bytes") for g in opt.param_groups]
        torchrun.load_state_dicts(model, opt, payload["model"], payload["optimizer"], par)
        # the step's memory budget is the library's default, never the run's (no config key sets it):
        # keep today's, not the checkpoint's (one written before "auto" holds 32 MiB: 3-4x slower on a GPU)
        for group, chunk_bytes in zip(opt.param_groups, built):
            if chunk_bytes is not None:
                group["chunk_bytes"] = chunk_bytes
        data.sampler.load_state_dict(payload["loader"])
        checkpoint.set_rng_state(payload["rng"])
        start, elapsed, wall = int(payload["step"]), float(payload["elapsed_s"]), float(payload["wall_s"])
        step_times = list(payload["step_times"])
    vers = versions()
    backend = backend_label(cfg, device)  # what "auto" resolves to on this hardware
    if payload is None or old_run_info is None:  # a new run (or one whose run.json is gone)
        run_info = {"seed": cfg.seed, "versions": vers, "argv": argv, "device": str(device), "data": info}
        run_info["amp"] = str(amp) if amp else None
        run_info["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z") if payload is None else None
        run_info["resumed_from_steps"] = []
        run_info["parallel"] = {"mode": par.mode, "processes": par.world}
        run_info["backends"] = [[0, backend]] if payload is None else []
    if payload is not None:
        run_info = old_run_info or run_info
        run_info.setdefault("resumed_from_steps", []).append(start)
        history = run_info.setdefault("backends", [])  # (runs from before it was recorded: from here)
        history[:] = [h for h in history if h[0] < start]  # steps after the checkpoint are undone
        if not history or history[-1][1] != backend:
            if history and par.is_main:
                print(
                    f"htmuon: warning: '{out}' ran up to step {start} on backend '{history[-1][1]}', which "
                    f"resolves to '{backend}' on this machine: it continues on '{backend}' (run.json "
                    "'backends' records the switch and the summary names both)",
                    file=sys.stderr,
                    flush=True,
                )
            history.append([start, backend])
        now_amp = str(amp) if amp else None
        if "amp" in run_info and run_info["amp"] != now_amp:  # dtype "auto" on a device without bf16
            if par.is_main:
                print(
                    f"htmuon: warning: '{out}' ran up to step {start} with autocast "
                    f"{run_info['amp'] or 'off (fp32)'}, which is {now_amp or 'off (fp32)'} on this device "
                    f"({device}): it continues so (run.json 'amp' records the switch; --dtype pins it)",
                    file=sys.stderr,
                    flush=True,
                )
            run_info["amp"] = now_amp
            run_info.setdefault("amp_from_step", []).append([start, now_amp])
    if par.is_main:
        stale = out / "summary.json"
        if payload is not None and stale.exists():  # an end this run goes on from (a finished run whose
            # final checkpoint was damaged): it no longer describes the folder, whose checkpoints now go
            # back to step `start` (`compare` would reuse it as done, with mid-run weights); written anew
            with _file_errors(stale):
                stale.unlink()
            print(
                f"htmuon: '{stale}' described the run's earlier end; removed, as the run continues from "
                f"step {start} (it is written again when the run ends)",
                file=sys.stderr,
                flush=True,
            )
        if payload is not None and old_run_info is None:  # (said once the resume is known to go ahead)
            print(
                f"htmuon: no run.json in '{out}': written anew (the run's start and command are not known)",
                file=sys.stderr,
                flush=True,
            )
        if config_note:
            print(f"htmuon: {config_note}", file=sys.stderr, flush=True)
        metrics = _start_run_folder(
            out,
            cfg,
            run_info,
            start if payload is not None else None,
            bool(lock.made),
            write_config=config_note is not None,
        )
    else:
        metrics = _NoMetrics()

    def save_ckpt(step: int) -> None:
        model_sd, opt_sd = torchrun.state_dicts(model, opt, par)  # whole tensors (FSDP2: gathered)
        if not par.is_main:
            torchrun.barrier(par)
            return
        metrics.sync()  # the records up to this step, on disk before the checkpoint that holds it
        checkpoint.save(
            ckpt_path,
            {
                "step": step,
                "elapsed_s": elapsed,
                "wall_s": wall,
                "step_times": list(step_times),
                "config": to_dict(cfg),
                "versions": vers,
                "seed": cfg.seed,
                "model": model_sd,
                "optimizer": opt_sd,
                "loader": data.sampler.state_dict(),
                "data": {k: info[k] for k in _DATA_IDENTITY if k in info},  # checked on resume
                "rng": checkpoint.rng_state(),
            },
        )
        torchrun.barrier(par)

    # alpha during training: on the main process (under DDP every rank holds the whole model; under
    # FSDP2 the weights are sharded, so it is left out there, as at the end of the run)
    track_alpha = cfg.alpha_every > 0 and par.mode != "fsdp" and par.is_main
    label = f"{cfg.optimizer}/seed{cfg.seed}"
    unit = "tok/s" if model_task(cfg.model) == "lm" else "img/s"  # tokens_per_batch: samples for images
    progress = _Progress(cfg.progress if par.is_main else "none", cfg.steps, start, label, unit)
    diverged, stopped, last_val, final_eval_s = False, False, None, None
    why = ""  # what diverged: the loss or the gradient norm
    steps_done = start
    tokens_per_step = data.tokens_per_batch * cfg.grad_accum
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    peer_stop = False  # another rank was signalled (under torchrun)
    # noted until the summary is written: a signal after the last step lets the run finish, and is
    # reported (not saved: a reused summary must not stop `compare` again)
    with StopOnSignal(alone=par.world == 1, quiet=not par.is_main) as stop:
        steps = range(start + 1, cfg.steps + 1)
        if stop_after is not None and stop_after <= start < cfg.steps:
            steps, stopped = range(0), True  # resumed at or past stop_after: nothing to train
        try:
            for step in steps:
                t0 = time.perf_counter()
                factor = lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
                for g, base in zip(opt.param_groups, base_lrs):
                    g["lr"] = base * factor
                loss_sum = 0.0  # becomes a tensor: one host sync per step, not per micro-batch
                for _ in range(cfg.grad_accum):
                    x, y = (torchrun.batch_slice(t, par) for t in data.next_batch())  # this rank's rows
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        loss, _ = _loss(module, task, x, y)
                    (loss / cfg.grad_accum).backward()
                    loss_sum = loss_sum + loss.detach().float()
                # one collective: the loss for the log, and whether any rank was asked to stop (so that every
                # rank stops after this same step)
                signalled = stop.signum is not None
                loss_val, stop_now = torchrun.mean_and_any(float(loss_sum) / cfg.grad_accum, signalled, par)
                peer_stop = stop_now and not signalled
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                    diverged = True
                    why = (
                        f"loss {loss_val}"
                        if not math.isfinite(loss_val)
                        else f"non-finite gradient norm {grad_norm} at loss {loss_val}"
                    )
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                elapsed += dt
                step_times.append(dt)
                steps_done = step
                tps = tokens_per_step / dt
                log = step % cfg.log_every == 0 or step == 1 or step == cfg.steps or diverged
                if log:
                    metrics.write(
                        {
                            "step": step,
                            "kind": "train",
                            "loss": loss_val,
                            "lr": opt.param_groups[0]["lr"],
                            "grad_norm": grad_norm,
                            "tokens_per_s": tps,
                            "step_ms": dt * 1e3,
                            "elapsed_s": elapsed,
                        }
                    )
                val = None
                if step == cfg.steps and not diverged:  # the end: the whole held-out split by default
                    t_eval = time.perf_counter()
                    val = evaluate(model, data, task, device, amp, cfg.final_eval_batches)
                    final_eval_s = time.perf_counter() - t_eval
                elif step % cfg.eval_every == 0 and not diverged:
                    window = step // cfg.eval_every  # evaluation k reads window k of the split
                    val = evaluate(model, data, task, device, amp, cfg.eval_batches, window)
                if val:
                    last_val = val
                    metrics.write({"step": step, "kind": "val", **val, "elapsed_s": elapsed})
                if track_alpha and not diverged and step % cfg.alpha_every == 0:
                    # the weights' layer-wise alpha (outside the timed step, like evaluation)
                    metrics.write({"step": step, "kind": "alpha", "mean_alpha": mean_alpha(model)})
                progress.update(step, cfg.steps, loss_val, tps, log, val)
                if diverged:
                    print(
                        f"{label}: training diverged at step {step} ({why}); stopping",
                        file=sys.stderr,
                    )
                    break
                wall += time.perf_counter() - t0
                if par.world == 1:  # alone, a signal that came later in the step counts too
                    stop_now = stop.signum is not None
                stop_here = stop_now or (stop_after is not None and step >= stop_after)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or stop_here:
                    save_ckpt(step)
                    # alone, a signal during that write stops here: the checkpoint just written holds
                    # this step (under torchrun the ranks agree at the next step's vote)
                    stop_here = stop_here or (par.world == 1 and stop.signum is not None)
                if stop_here and step < cfg.steps:
                    stopped = True
                    break
        finally:
            progress.close()
            metrics.close()

        # steps_done is the loop's own count: a stop or divergence step need not be a logged one
        summary = summarize(
            out, cfg, metrics.records, last_val, diverged, stopped, info, step_times, steps_done, elapsed
        )
        if diverged:
            summary["diverged_why"] = why
        summary["backend"] = backend_history_label(run_info.get("backends") or [[0, backend]])
        summary["wall_s"] = wall  # steps + evaluations (checkpoint writes excluded)
        summary["final_eval_s"] = final_eval_s
        if not stopped and not diverged and cfg.alpha and par.mode != "fsdp" and par.is_main:
            summary["mean_alpha"] = mean_alpha(model)  # (not under FSDP2: the weights are sharded)
        torchrun.barrier(par)
        if not stopped and par.is_main:
            write_run_file(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if stop.signum is not None or peer_stop:  # stopped by it, or (after the last step's vote) finished
        summary["signal"] = signal.Signals(stop.signum).name if stop.signum else "a signal to another rank"
    return summary


class StopOnSignal:
    """While a run trains: SIGTERM (a scheduler's preemption, ``kill``, torchrun passing on its own) or
    SIGINT (Ctrl-C) is noted, not acted on at once; the loop finishes the step, writes a checkpoint and
    returns the run stopped, so that nothing since the last periodic checkpoint is lost. A signal the
    process ignores (``SIG_IGN``: SIGINT in a background job of a non-interactive shell) stays ignored.

    A second signal to a single process gets the handler from before (SIGINT: KeyboardInterrupt;
    SIGTERM: the process ends), for a user who will not wait. Under torchrun (``alone=False``) repeats
    are ignored: a launcher passes on the signal its workers may have had already (Ctrl-C in a
    terminal reaches torchrun and every worker, and torchrun sends it to them again; srun signals every
    process of the job step), so a repeat says nothing about the user; torchrun's SIGKILL after its
    grace period, or ``kill -9``, ends a rank at once. Installed only in the main thread (where Python
    delivers signals); elsewhere a no-op."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, alone: bool = True, quiet: bool = False) -> None:
        self.signum: int | None = None
        self.alone, self.quiet = alone, quiet
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # one the process ignores stays ignored
                    self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # a repeat under torchrun (alone, the handler is gone by now)
            return
        self.signum = signum
        name = signal.Signals(signum).name
        if self.alone:
            self.__exit__()  # the next one acts at once
            then = f"{name} again to stop at once, from the last periodic checkpoint"
        else:
            then = "every rank; kill -9 to stop at once, from the last periodic checkpoint"
        if not self.quiet:  # os.write: a print here could re-enter the progress line's print
            os.write(2, f"\nhtmuon: {name}: stopping after this step, with a checkpoint ({then})\n".encode())

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def backend_history_label(history: list) -> str | None:
    """The backend of a run as its summary names it, from run.json's ``backends`` ([[from_step, label],
    ...]): the label, or, for a run resumed on hardware that resolves "auto" differently, each label
    with the step it took over (``"ns, bf16; ns, fp32 from step 1200"``; a run started before the
    record existed: ``"not recorded; ns, fp32 from step 1200"``)."""
    labels = [label for _, label in history]
    if not labels or all(label is None for label in labels):  # AdamW and the other baselines
        return None
    if history[0][0] > 0:  # a run started before backends were recorded
        history = [[0, "not recorded"], *history]
    elif len(set(labels)) == 1:
        return labels[0]
    first, *rest = history
    return "; ".join([str(first[1])] + [f"{label} from step {step}" for step, label in rest])


#: What identifies a run's data in run.json's "data": a digest of the tokens' content
#: (:func:`htmuon.train.data.tokens_digest`; not the cache's key, which follows the files' modification
#: times) and the split sizes.
_DATA_IDENTITY = ("tokens_digest", "train_tokens", "val_tokens", "train_samples", "val_samples", "classes")


def _check_same_data(then: dict, now: dict, cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume a run on data other than what it was started on (a changed or re-tokenised file
    would give the saved weights and loader position other tokens, silently)."""
    for key in _DATA_IDENTITY:
        a, b = then.get(key), now.get(key)
        if a is None or b is None:
            continue  # not recorded then (an older run) or not this kind of data
        if a != b:
            if key == "tokens_digest":
                a, b = f"{a[:12]}...", f"{b[:12]}..."
            raise UserError(
                f"the data of the run in '{out}' changed since it was started ({key}: {a} then, {b} now; "
                f"data '{cfg.data}'): resume it on the data it started on, or start a new run"
            )


def _start_run_folder(
    out: Path,
    cfg: TrainConfig,
    run_info: dict,
    keep_until_step: int | None,
    made: bool = False,
    write_config: bool = False,
) -> Metrics:
    """Write config.json (a new run, or ``write_config``: a resumed one whose config.json is gone),
    run.json and the metrics files; if that fails, remove what this call created, so a retry is not
    refused as "already holds a run". ``made``: the folder was made for this run (by its lock, which
    removes it when released empty): then all of it but the lock is removed."""
    new_run = keep_until_step is None and not (out / "config.json").exists()  # nothing here to keep
    try:
        with _file_errors(out):
            out.mkdir(parents=True, exist_ok=True)
        if keep_until_step is None or write_config:  # a new run, or one killed before its first checkpoint
            write_run_file(out / "config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
        write_run_file(out / "run.json", json.dumps(run_info, indent=2) + "\n")
        return Metrics(out, keep_until_step, cfg.tensorboard)
    except BaseException:
        if new_run:
            for name in ("config.json", "run.json", "metrics.jsonl", "metrics.csv"):
                (out / name).unlink(missing_ok=True)
            if made:
                import shutil

                for p in out.iterdir():
                    if p.name == RUN_LOCK_NAME:
                        continue
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
        raise


def summarize(out, cfg, records, last_val, diverged, stopped, info, step_times, steps_done, elapsed) -> dict:
    train_recs = [r for r in records if r["kind"] == "train"]
    val_recs = [r for r in records if r["kind"] == "val"]
    step_ms = sorted(t * 1e3 for t in step_times[1:])  # all steps but the first (warm-up)
    final = last_val or (
        {k: val_recs[-1][k] for k in ("loss", "ppl", "acc") if k in val_recs[-1]} if val_recs else None
    )
    return {
        "run_dir": str(out),
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "model": cfg.model,
        "data": cfg.data,
        "steps_done": steps_done,
        "steps": cfg.steps,
        "finished": not stopped and not diverged,
        "stopped": stopped,
        "diverged": diverged,
        "final_val_loss": float("inf") if diverged or not final else final["loss"],
        "final_val_ppl": (float("inf") if diverged else final.get("ppl")) if final else None,
        "final_val_acc": (final.get("acc") if final and not diverged else None),
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
        "ms_per_step": step_ms[len(step_ms) // 2] if step_ms else None,  # median step time
        "elapsed_s": elapsed,
        "info": info,
    }
