"""The run configuration: every default, with its help text, in one block (nanoGPT spirit).

A config is built as: these defaults < a run preset (``--preset``) < a JSON/TOML file
(``--config``) < command-line flags (``--steps 500``). A wrong key, type or range is a ``UserError``
naming the key and the value (and the file, for a value read from one). The resolved config is
saved as ``config.json`` in the run folder and inside every checkpoint (as its "config" entry).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path

from htmuon.cli import UserError


def _key(default, help: str):
    """A config key: its default and its one-line ``--help`` text (the field's ``metadata["help"]``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- model ------------------------------------------------------------------------------
    model: str = _key("llama-tiny", "llama-*, gpt2-*, resnet-*, resnet18/34/50, vit-* (docs/harness.md: all)")
    # --- data -------------------------------------------------------------------------------
    data: str = _key(
        "auto",
        "auto | shakespeare | FILE.txt/.jsonl | DIR | hf[-cache]:NAME[:CFG] | hf-disk:PATH | digits | "
        "cifar10:DIR | cifar100:DIR | imagenet:DIR (auto: shakespeare for LLaMA, digits for ResNets)",
    )
    text_field: str = _key("text", "JSONL / datasets field holding the text")
    max_docs: int = _key(0, "read at most this many documents (0 = all; set it for hub datasets)")
    val_fraction: float = _key(
        0.05, "held-out share, in (0, 0.5] (every round(1/val_fraction)-th chunk; digits: 0.2 fixed)"
    )
    vocab_size: int = _key(4096, "BPE vocabulary trained on the train split (unused with --tokenizer)")
    tokenizer: str = _key("", "a local Hugging Face tokenizer folder (e.g. T5's); '' = train the local BPE")
    seq_len: int = _key(128, "tokens per sequence")
    # --- optimizer --------------------------------------------------------------------------
    optimizer: str = _key(
        "htmuon", "adamw | muon | htmuon | mars | soap | cosmos | ... (docs/harness.md: all)"
    )
    lr: float | None = _key(None, "matrix-part lr (AdamW: its lr); None = the preset's/optimizer's default")
    adamw_lr: float | None = _key(
        None,
        'lr of the AdamW part (norms, biases; embeddings + head under "standard"); None = preset\'s, or 1e-3',
    )
    p: float | None = _key(
        None,
        "spectral power; None = the optimizer's (0 for muon/normuon/adamuon, 0.125 for the htmuon* names)",
    )
    method: str | None = _key(
        None,
        "auto | svd | eigh | fast | fast5 | ns; None = the optimizer's (ns for muon/normuon/adamuon, "
        "else auto)",
    )
    spectrum: str | None = _key(None, "power | rank (the paper's \"HT\"); None = the optimizer's")
    scale: str = _key("raw", "raw (the paper's, faithful) | muon_rms (scale-invariant)")
    interval: int | None = _key(None, "spectral correction every k-th step (None = the optimizer's)")
    routing: str = _key("standard", "standard (embeddings + head -> AdamW) | paper (-> HTMuon, as the paper)")
    momentum: float = _key(0.95, "Muon-family momentum (Nesterov)")
    adamw_beta1: float = _key(0.9, "AdamW (and the AdamW part's) beta1")
    adamw_beta2: float = _key(0.95, "AdamW (and the AdamW part's) beta2")
    weight_decay: float = _key(0.1, "decoupled, on matrices (the paper: 0.1); see wd_mode")
    wd_mode: str = _key(
        "lr", "lr (torch: decay lr x wd per step) | independent (wd per step at peak, x schedule)"
    )
    # --- schedule and budget ----------------------------------------------------------------
    steps: int = _key(300, "optimizer steps")
    warmup_steps: int = _key(30, "linear warmup, then cosine decay to min_lr_ratio of the peak")
    warmup_fraction: float | None = _key(
        None, "warmup as a share of steps (the paper's 0.1), instead of warmup_steps (not both)"
    )
    tokens_per_param: float = _key(
        0.0, "> 0: steps = this x parameters / tokens per step (a size-scan budget)"
    )
    min_lr_ratio: float = _key(0.1, "the cosine's floor, a fraction of the peak lr (the paper's 0.1x)")
    batch_size: int = _key(16, "sequences (images) per micro-batch")
    grad_accum: int = _key(1, "micro-batches per optimizer step")
    grad_clip: float = _key(1.0, "max global gradient norm (0 = off)")
    dtype: str = _key("auto", "auto (bf16 autocast on a bf16 GPU, else fp32) | fp32 | bf16")
    device: str = _key("auto", "auto | cpu | cuda | cuda:N")
    threads: int = _key(0, "torch CPU threads (0 = torch's default)")
    parallel: str = _key("auto", "under torchrun: auto (DDP if > 1 process) | none | ddp | fsdp (FSDP2)")
    seed: int = _key(0, "seed of the model's initialisation and the data order")
    # --- evaluation, logging, checkpoints ---------------------------------------------------
    eval_every: int = _key(50, "validation loss/perplexity every N steps (and at the end)")
    eval_batches: int = _key(
        16, "validation batches per evaluation, a window rotating over the split (0 = all)"
    )
    final_eval_batches: int = _key(0, "validation batches of the evaluation at the end (0 = the whole split)")
    log_every: int = _key(10, "train-loss records / log lines every N steps")
    ckpt_every: int = _key(100, "checkpoint every N steps (and at the end); 0 = only at the end")
    out_dir: str = _key("auto", "the run folder (auto = runs/MODEL-OPTIMIZER-seedSEED)")
    progress: str = _key("auto", "auto (bar on a terminal, log lines otherwise) | bar | log | none")
    tensorboard: bool = _key(False, "also write TensorBoard events (needs the tensorboard package)")
    alpha: bool = _key(True, "mean layer-wise alpha at the end (needs htmuon.diagnostics)")
    alpha_every: int = _key(0, "also record the mean layer-wise alpha every N steps (0 = off)")


# fields that may differ between a checkpoint and the run resuming it
RESUMABLE_CHANGES = frozenset(
    {
        "out_dir",
        "log_every",
        "ckpt_every",
        "progress",
        "tensorboard",
        "threads",
        "device",
        "alpha",
        "alpha_every",
    }
)

CHOICES = {
    "scale": ("raw", "muon_rms"),
    "wd_mode": ("lr", "independent"),
    "routing": ("standard", "paper"),
    "dtype": ("auto", "fp32", "bf16"),
    "progress": ("auto", "bar", "log", "none"),
    "parallel": ("auto", "none", "ddp", "fsdp"),
}
#: string keys that name a path or a source: a blank value would be the current folder (``Path("")``)
NOT_BLANK = ("data", "out_dir")
POSITIVE = ("vocab_size", "seq_len", "steps", "batch_size", "grad_accum", "eval_every", "log_every")
NON_NEGATIVE = (
    "warmup_steps",
    "max_docs",
    "eval_batches",
    "final_eval_batches",
    "tokens_per_param",
    "ckpt_every",
    "alpha_every",
    "threads",
    "grad_clip",
    "weight_decay",
)

_FIELDS = {f.name: f for f in fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _base_type(name: str) -> tuple[type, bool]:
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _closest_key(name: str) -> str | None:
    """The config key a misspelt ``name`` most likely meant, or None: the same letters but for dashes and
    underscores, the same words in another order (``lr_adamw``), else a close spelling that starts as
    ``name`` does (a typo keeps the word's start: ``methd``; ``data_dir`` is not ``out_dir``)."""
    norm = name.replace("-", "_")
    for k in _FIELDS:
        if k.replace("_", "") == norm.replace("_", "") or sorted(k.split("_")) == sorted(norm.split("_")):
            return k
    return next((k for k in difflib.get_close_matches(norm, list(_FIELDS), n=3) if k[:2] == norm[:2]), None)


def coerce(name: str, value, *, from_string: bool = False, where: str = ""):
    """Check/convert one value for field ``name``; a wrong type is a UserError naming both."""
    if name not in _FIELDS:
        close = _closest_key(name)
        hint = f" (did you mean '{close}'?)" if close else ""
        raise UserError(f"unknown config key '{name}'{where}{hint}")
    typ, optional = _base_type(name)
    bad = UserError(f"config key '{name}' must be {_type_word(typ, optional)}, got {value!r}{where}")
    if value is None or (from_string and optional and str(value).lower() in ("none", "null")):
        if optional:
            return None
        raise bad
    if from_string:
        s = str(value).strip()
        try:
            if typ is bool:
                low = s.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if typ is int:
                return int(s)
            if typ is float:
                v = float(s)
                if not math.isfinite(v):
                    raise ValueError
                return v
            return s
        except ValueError:
            raise bad from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise bad
    if isinstance(value, str):
        return value
    raise bad


def _type_word(typ: type, optional: bool) -> str:
    word = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[typ]
    return word + (" or null" if optional else "")


def validate(cfg: TrainConfig, origins: dict[str, str] | None = None) -> TrainConfig:
    """Range checks that do not need the heavy modules (names are checked when resolved).
    ``origins``: key -> where its value came from (" in FILE"), appended to that key's error."""
    origins = origins or {}

    def bad(key: str, rule: str) -> UserError:
        where = origins.get(key, "")
        return UserError(f"config key '{key}' must be {rule}, got {getattr(cfg, key)!r}{where}")

    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise bad(key, f"one of {list(allowed)}")
    for key in NOT_BLANK:  # "" is the current folder as a path: an unset shell variable ran there
        if not getattr(cfg, key).strip():
            raise bad(
                key, "a name or a path, not blank (a blank path is the current folder; 'auto' is the default)"
            )
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise bad(key, "> 0")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise bad(key, ">= 0")
    if cfg.warmup_fraction is not None and not 0.0 <= cfg.warmup_fraction <= 1.0:
        raise bad("warmup_fraction", "in [0, 1]")
    if cfg.warmup_fraction is None and cfg.tokens_per_param == 0 and cfg.warmup_steps > cfg.steps:
        raise UserError(
            f"warmup_steps ({cfg.warmup_steps}){origins.get('warmup_steps', '')} must not exceed "
            f"steps ({cfg.steps}){origins.get('steps', '')}"
        )
    if not 0.0 < cfg.val_fraction <= 0.5:  # every k-th chunk is held out, k >= 2
        raise bad("val_fraction", "in (0, 0.5]")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise bad("min_lr_ratio", "in [0, 1]")
    if cfg.lr is not None and cfg.lr <= 0:
        raise bad("lr", "> 0")
    if cfg.adamw_lr is not None and cfg.adamw_lr <= 0:
        raise bad("adamw_lr", "> 0")
    if cfg.p is not None and not 0.0 <= cfg.p <= 1.0:
        raise bad("p", "in [0, 1]")
    if cfg.interval is not None and cfg.interval < 1:
        raise bad("interval", ">= 1")
    if not 0 <= cfg.seed < 2**32:  # numpy's legacy seed range (the loop seeds numpy with it)
        raise bad("seed", "in [0, 2**32)")
    for key in ("momentum", "adamw_beta1", "adamw_beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise bad(key, "in [0, 1)")
    return cfg


YAML = (".yaml", ".yml")


def _no_repeats(path: str, pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict, refusing a key given twice (``json`` keeps the last silently;
    TOML refuses it too)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise UserError(f"config file '{path}' sets '{k}' twice ({out[k]!r}, then {v!r})")
        out[k] = v
    return out


def read_config_file(path: str) -> dict:
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"config file '{path}' is a folder, not a file")
    if not p.is_file():
        raise UserError(f"config file '{path}' not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config file '{path}' is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UserError(f"cannot read config file '{path}': {e.strerror or e}") from None
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise UserError("reading a TOML config needs Python >= 3.11 or `pip install tomli`") from None
        try:
            data = tomllib.loads(text)
        except Exception as e:
            raise UserError(f"config file '{path}' is not valid TOML: {e}") from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=functools.partial(_no_repeats, path))
        except json.JSONDecodeError as e:
            other = " (a config file is JSON or TOML, .toml; YAML is not read)" if p.suffix in YAML else ""
            raise UserError(
                f"config file '{path}' is not valid JSON: {e.msg} (line {e.lineno}){other}"
            ) from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a table/object of config keys")
    # a run's config wrapped in an object {"config": {...}} (as a checkpoint holds it) is read
    # from inside; a key beside it would be ignored, so it is refused
    if isinstance(data.get("config"), dict):
        beside = [k for k in data if k != "config"]
        if beside:
            names = ", ".join(f"'{k}'" for k in beside)
            raise UserError(
                f"config file '{path}': top-level key{'s' if len(beside) > 1 else ''} {names} beside its "
                "'config' object would be ignored (put config keys inside 'config', or drop the wrapper)"
            )
        data = data["config"]
    return data


def warmup_for(fraction: float, steps: int) -> int:
    """The warmup steps of a ``warmup_fraction`` over ``steps`` (what the loop trains): the nearest whole
    step, a half rounded up, of the fraction as written (its shortest decimal, so ``0.1 x 35`` is 3.5
    and not the float product 3.5000000000000004). 10% of 25 steps is 3 (Python's ``round``, half to
    even, gave 2), of 45 is 5 (not 4), of 250 is 25. A positive fraction gives 0 only where it is under
    half a step (10% of fewer than 5 steps), where a 1-step warmup would change nothing: its one step
    runs at the peak lr too."""
    exact = Fraction(repr(float(fraction))) * steps
    return math.floor(exact + Fraction(1, 2))


def _one_warmup(items: dict, where: str) -> None:
    """Refuse ``warmup_steps`` and a ``warmup_fraction`` given in one place (the command line, one config
    file) that disagree: the fraction won without a word. A pair that agrees at the steps given there
    is taken (a run's saved ``config.json`` holds both, the steps resolved from the fraction)."""
    w, f = items.get("warmup_steps"), items.get("warmup_fraction")
    if w is None or f is None:
        return
    steps = items.get("steps")
    if isinstance(steps, int) and steps > 0 and warmup_for(f, steps) == w:
        return
    at = f": {f} x {steps} steps is {warmup_for(f, steps)}" if isinstance(steps, int) and steps > 0 else ""
    raise UserError(
        f"warmup_steps ({w}) and warmup_fraction ({f}) are both given {where}{at}; give one of them (a "
        "fraction scales with the steps)"
    )


def make_config(
    preset: dict | None = None,
    file: str | None = None,
    overrides: dict | None = None,
    *,
    strings: bool = False,
) -> TrainConfig:
    """defaults < preset < file < overrides (overrides given as strings when ``strings``).

    The warmup is one setting given as either key: a later source's ``warmup_steps`` or
    ``warmup_fraction`` replaces an earlier source's warmup; the two in one source given by the user
    (the file, the overrides) must agree (:func:`_one_warmup`)."""
    values: dict = {}
    origins: dict = {}  # key -> " in FILE" for a value from the config file (its errors name the file)
    for where, items, from_string, given in (
        ("", preset or {}, False, None),  # a preset's keys are not the user's: not checked together
        (f" in {file}" if file else "", read_config_file(file) if file else {}, False, f"in {file}"),
        ("", overrides or {}, strings, "on the command line"),
    ):
        if "warmup_steps" in items and "warmup_fraction" not in items:
            values.pop("warmup_fraction", None)  # a later step count beats an earlier fraction
        layer = {k: coerce(k, v, from_string=from_string, where=where) for k, v in items.items()}
        if given:
            _one_warmup(layer, given)
        values.update(layer)
        origins.update(dict.fromkeys(layer, where))
    return validate(TrainConfig(**values), origins)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, where: str = "") -> TrainConfig:
    cfg = TrainConfig(**{k: coerce(k, v, where=where) for k, v in d.items()})
    return validate(cfg, dict.fromkeys(d, where))


def identity_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Keys (other than RESUMABLE_CHANGES) whose values differ between two configs."""
    return [
        f.name
        for f in fields(TrainConfig)
        if f.name not in RESUMABLE_CHANGES and getattr(a, f.name) != getattr(b, f.name)
    ]
