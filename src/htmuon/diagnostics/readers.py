"""Checkpoint readers for :func:`~htmuon.diagnostics.analyze`: shapes first, weights a few at a time.

:func:`open_checkpoint` recognises a file or folder and returns a :class:`Checkpoint`: the names,
shapes and dtypes of its tensors (read without loading any weights) and :meth:`Checkpoint.load`,
which reads the named tensors only. :func:`~htmuon.diagnostics.analyze` loads one batch of
same-shape layers at a time, so memory stays bounded by that batch, not by the checkpoint.

Formats (a folder is searched in this order):

* Hugging Face: ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
  ``pytorch_model.bin.index.json`` (sharded), ``pytorch_model.bin``; any ``*.safetensors`` file or
  ``*.index.json``. safetensors files are opened per load with ``safe_open`` (one tensor read at a
  time, nothing executed).
* torch.distributed.checkpoint (DCP): a folder with a ``.metadata`` file. The metadata is a pickle;
  it is read with an unpickler that admits only DCP's own metadata classes. When every weight is
  under ``model.`` and the checkpoint holds other entries too (``{"model": ..., "step": ...}``), the
  tensors under ``model.`` are used with that prefix removed; otherwise all tensors.
* ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, Lightning ``.ckpt``; htmuon's run folder
  ``ckpt.pt``): a state_dict, or a dict with one under ``"model"`` (htmuon, most training loops),
  ``"state_dict"`` (Lightning), ``"model_state_dict"`` (the PyTorch tutorial's checkpoint) or
  ``"module"`` (DeepSpeed's ``mp_rank_00_model_states.pt``), tried
  in that order (the first that holds weights is used; the report's notes name any other). Loaded
  with ``weights_only=True`` and ``mmap=True`` (zip format): only the pickle is parsed, tensor
  bytes are read when used. An htmuon training checkpoint (its
  payload's ``format`` tag) is checked against its SHA-256 trailer as resuming checks it: a changed
  byte, a damaged trailer or a cut archive is refused; a whole archive without the trailer (from
  before checksums, v1, or saved again by ``torch.save``) is read unverified, with a note. Objects
  the weights-only unpickler refuses (RNG states, config objects, Lightning's hyper-parameters) are
  replaced by inert placeholders -- their code never runs -- since only the tensors are needed. A
  file whose weights are pickled Python objects (``torch.save(model)``) needs ``allow_pickle=True``,
  which *executes code from the file*: only for files you trust.

Key prefixes: ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) are removed when every
tensor key has them; in a Lightning checkpoint the LightningModule's attribute (e.g. ``model.``) is
removed when every key shares it (then those wrapper prefixes again: ``model._orig_mod.``), so names
match the same model saved by Hugging Face or htmuon.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FOLDER_FILES", "Checkpoint", "TensorMeta", "open_checkpoint"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN = "pytorch_model.bin"
DCP_METADATA = ".metadata"
#: htmuon's training checkpoint in a run folder (``htmuon.train.checkpoint.CKPT_NAME``).
HTMUON_CKPT = "ckpt.pt"
#: The files a checkpoint folder is recognised by, in the order they are looked for.
FOLDER_FILES = (SAFETENSORS_INDEX, SAFETENSORS, BIN_INDEX, BIN, DCP_METADATA, HTMUON_CKPT)
#: File suffixes taken as a checkpoint when a folder holds exactly one such file.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
#: Keys of a training checkpoint dict that hold the model's state_dict, in the order tried: htmuon and
#: most training loops, Lightning, the PyTorch tutorial's
#: ``{"model_state_dict": ..., "optimizer_state_dict": ...}``, DeepSpeed's ``mp_rank_00_model_states.pt``.
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")
#: Wrapper prefixes removed when every tensor key has them (DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"  # a zip's end-of-central-directory record
#: How a Git LFS pointer file starts (a model repository cloned without ``git lfs``).
_LFS_POINTER = b"version https://git-lfs"
_PICKLE_PROTO = 0x80


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor (``dtype`` is None for a type torch cannot hold)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None

    @property
    def is_floating_point(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point


class Checkpoint:
    """A checkpoint on disk: tensor metadata up front, tensors read on request.

    Attributes:
        path: the file or folder given.
        format: ``"safetensors"``, ``"torch"``, ``"dcp"`` or ``"module"`` (a trusted pickled model).
        entries: ``{name: TensorMeta}`` of the model's tensors (prefixes removed, see module doc).
        module: the ``nn.Module`` of a pickled full model (``allow_pickle=True``), else None.
        notes: what was done to read it (placeholders used, prefixes removed), for the report.
        tied: ``{name: first name}`` for tensors stored as views of an earlier one's storage (a tied
            LM head in a ``torch.save`` file); empty where the format keeps no such sharing.

    Use as a context manager or call :meth:`close`; :meth:`load` may be called any number of times.
    """

    format = "?"

    def __init__(self, path: str, entries: dict[str, TensorMeta], notes: Sequence[str] = ()):
        self.path = path
        self.entries = entries
        self.module: nn.Module | None = None
        self.notes = list(notes)
        self.tied: dict[str, str] = {}

    def load(self, names: Iterable[str]) -> dict[str, Tensor]:
        """Read the named tensors (CPU); only these are loaded. Raises ValueError naming the file."""
        names = list(names)
        unknown = [n for n in names if n not in self.entries]
        if unknown:
            raise KeyError(f"{self.path!r} has no tensor {unknown[0]!r}")
        return self._read(names) if names else {}

    def _read(self, names: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the reader holds (nothing stays open between :meth:`load` calls)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, format={self.format!r}, tensors={len(self.entries)})"


# ----------------------------------------------------------------------------- prefixes


def _strip_prefixes(keys: list[str], lightning: bool) -> tuple[dict[str, str], list[str]]:
    """``{name: stored key}`` with the wrapper (and Lightning attribute) prefixes removed."""
    names = list(keys)
    notes: list[str] = []

    def unwrap(names: list[str]) -> list[str]:
        changed = True
        while changed and names:
            changed = False
            for p in WRAPPER_PREFIXES:
                if all(n.startswith(p) for n in names):
                    names = [n[len(p) :] for n in names]
                    notes.append(f"removed key prefix {p!r}")
                    changed = True
        return names

    names = unwrap(names)
    if lightning and names:
        first = {n.split(".", 1)[0] for n in names}
        if len(first) == 1 and all("." in n for n in names):
            p = first.pop() + "."
            rest = [n[len(p) :] for n in names]
            if all("." in n for n in rest):  # keep "layer.weight", never leave a bare "weight"
                names = rest
                notes.append(f"removed the LightningModule attribute prefix {p!r}")
                # a compiled or DDP-wrapped submodule (self.model = torch.compile(net)): "model._orig_mod."
                names = unwrap(names)
    return dict(zip(names, keys)), notes


# ----------------------------------------------------------------------------- safetensors


def _safe_open(path: str):
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path!r} needs safetensors: pip install htmuon[checkpoints]") from e
    try:
        return safe_open(path, framework="pt", device="cpu")
    except FileNotFoundError:
        raise ValueError(f"cannot read {path!r}: no such file") from None
    except Exception as e:  # SafetensorError, OSError, ...
        raise ValueError(f"cannot read {path!r} as safetensors: {e}") from e


def _natural_key(name: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


class _SafetensorsCheckpoint(Checkpoint):
    format = "safetensors"

    def __init__(self, path: str, files: dict[str, str]):
        """``files``: ``{stored key: file}`` (one file, or a sharded index's ``weight_map``)."""
        entries: dict[str, TensorMeta] = {}
        keys: dict[str, str] = {}
        for file in dict.fromkeys(files.values()) if files else [path]:
            with _safe_open(file) as f:
                for key in f.keys():
                    if files.get(key, file) != file:
                        continue  # the index assigns this key to another shard
                    sl = f.get_slice(key)
                    entries[key] = TensorMeta(tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype()))
                    keys[key] = file
        missing = [k for k in files if k not in keys]
        if missing:
            raise ValueError(
                f"{path!r}: the index lists {missing[0]!r} in {files[missing[0]]!r}, which lacks it"
            )
        # safetensors stores keys sorted as strings; put "layers.10" after "layers.9"
        names, notes = _strip_prefixes(sorted(entries, key=_natural_key), lightning=False)
        super().__init__(path, {n: entries[k] for n, k in names.items()}, notes)
        self._where = {n: (keys[k], k) for n, k in names.items()}

    def _read(self, names: list[str]) -> dict[str, Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self._where[n][0], []).append(n)
        out = {}
        for file, ns in by_file.items():
            with _safe_open(file) as f:  # opened per call: no mapping outlives the batch
                for n in ns:
                    try:
                        out[n] = f.get_tensor(self._where[n][1])
                    except Exception as e:
                        raise ValueError(f"cannot read tensor {n!r} from {file!r}: {e}") from e
        return out


# ----------------------------------------------------------------------------- torch.save files


class _Opaque:
    """Inert stand-in for a pickled object the weights-only unpickler refuses: takes any
    arguments and state, keeps nothing, runs no code from the file."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<unloaded {self.qualname}>"


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def _torch_load(path: str, allow_pickle: bool) -> tuple[Any, list[str]]:
    """``torch.load`` of a file (mmap when zip) and the names of the globals replaced by placeholders."""
    mmap = _is_zip(path)
    if allow_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap), []
        except Exception as e:
            raise ValueError(f"cannot read {path!r} as a torch checkpoint: {type(e).__name__}: {e}") from e
    try:
        return _load_with_placeholders(path, mmap)
    except pickle.UnpicklingError as e:
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(boiler)]
        said = [
            ln.split(_UNPICKLER_SAYS, 1)[1].split(". Please use", 1)[0]
            for ln in lines
            if _UNPICKLER_SAYS in ln
        ]
        why = said[0] if said else lines[0] if lines else "objects the weights-only unpickler refuses"
        raise ValueError(
            f"cannot read {path!r} with weights_only=True ({why}); loading it would execute "
            "code from the file: if you trust it, pass allow_pickle=True (htmuon esd --allow-pickle)"
        ) from e
    except Exception as e:  # zip/format errors come in many types
        if mmap and not _zip_has_end(path):  # miniz says "Invalid argument" or "central directory"
            raise ValueError(
                f"cannot read {path!r} as a torch checkpoint: the zip archive is cut short (no "
                "end-of-archive record; an interrupted save or copy?)"
            ) from e
        raise ValueError(f"cannot read {path!r} as a torch checkpoint: {type(e).__name__}: {e}") from e


_UNPICKLER_SAYS = "WeightsUnpickler error: "
#: The weights-only unpickler's refusal of a global, e.g. "Unsupported global: GLOBAL shutil.copyfile was ..."
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+) was not an allowed global")


def _placeholder(qualname: str) -> type:
    """A class standing in for the global ``qualname`` (module and name set, as torch 2.4 matches them)."""
    module, _, name = qualname.rpartition(".")
    return type(name, (_Opaque,), {"qualname": qualname, "__module__": module, "__qualname__": name})


def _load_with_placeholders(path: str, mmap: bool) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)`` of a zip checkpoint with every global the weights-only unpickler
    refuses read as a placeholder (nothing of it runs), and those globals' names; other files as they are.

    torch >= 2.5 lists the globals up front and allows them for one load (``safe_globals``). torch 2.4
    has neither: the refused globals are learnt one load at a time, allowed through its process-wide
    allowlist, which is restored afterwards."""
    from htmuon.train.checkpoint import allowed_globals

    unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if unsafe is not None:
        names = list(unsafe(path)) if mmap else []
        with allowed_globals([(_placeholder(n), n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), names
    names: list[str] = []
    while True:
        try:
            with allowed_globals([_placeholder(n) for n in names]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), names
        except pickle.UnpicklingError as e:
            refused = _REFUSED_GLOBAL.search(str(e))
            if not mmap or refused is None or refused.group(1) in names or len(names) >= 256:
                raise
            names.append(refused.group(1))


def _zip_has_end(path: str) -> bool:
    """Whether a zip file ends with its end-of-central-directory record (a cut archive does not);
    htmuon's checksum trailer may follow it."""
    from htmuon.train import checkpoint

    size = os.path.getsize(path)
    tail = 22 + 0xFFFF + checkpoint.TRAILER_LEN  # the record, its longest comment, the trailer
    with open(path, "rb") as f:
        f.seek(max(0, size - tail))
        data = f.read()
    at = data.rfind(_ZIP_END)  # the record: 22 bytes, the last 2 its comment's length
    return at >= 0 and len(data) - at >= 22 + int.from_bytes(data[at + 20 : at + 22], "little")


def _check_zip_crcs(path: str) -> str | None:
    """A ValueError naming ``path`` when a record of its zip archive fails its CRC-32: the pickle
    (``data.pkl``: the tensors' names, shapes and storages) or a tensor's bytes. torch.load checks
    neither: one changed byte in the pickle could rename a layer out of the analysis (or read as code
    the weights-only unpickler refuses), one in a tensor's bytes would change its alpha without a word.
    This reads the whole file once more (0.23 s for a 512 MiB archive on an AMD EPYC Zen 4, session 49),
    less than the analysis of its weights costs.
    A record stored with CRC 0 -- an archive written under ``torch.serialization.set_crc32_options
    (False)``, which stores none -- cannot be checked: the returned note says how many were not.
    Other zip trouble is left to torch.load, whose error names it."""
    import zipfile

    bad, unchecked = None, 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:  # no CRC stored (a real CRC of 0 is 1 in 2**32)
                    unchecked += 1
                    continue
                try:
                    with z.open(info) as f:  # raises BadZipFile at the end on a CRC mismatch
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile as e:
                    if "CRC" in str(e):
                        bad = info.filename
                        break
                    raise
    except Exception:  # not readable as a zip here: torch.load says why
        return None
    if bad is not None:
        raise ValueError(
            f"cannot read {path!r}: it is corrupt: its record {bad!r} fails its CRC-32 check "
            "(a damaged copy?)"
        )
    if unchecked:
        return (
            f"{os.path.basename(path)}: {unchecked} record(s) stored without a CRC-32 "
            "(torch.serialization.set_crc32_options(False)): their bytes could not be checked"
        )
    return None


def _storage_view(t: Tensor) -> tuple:
    """Which storage, where in it and how ``t`` looks at it: two names whose tensors give the same key
    are one tensor (a tied weight), in a module as in a loaded ``torch.save`` file."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _verify_htmuon_checksum(path: str) -> bool:
    """Check a file that ends with htmuon's checksum trailer (``torch.save``'s archive and a SHA-256
    trailer, see :mod:`htmuon.train.checkpoint`) before its weights are used: True when it matches; a
    ValueError names a changed byte. False for a file without that trailer's magic at its end: whether
    such a file needed one is told by its content (:func:`_check_htmuon_trailer`, after loading)."""
    from pathlib import Path

    from htmuon.train import checkpoint

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - checkpoint.TRAILER_LEN))
        if not f.read().startswith(checkpoint.TRAILER_MAGIC):
            return False
    try:
        return checkpoint.verify(Path(path))
    except checkpoint.CheckpointError as e:
        raise ValueError(str(e)) from None


def _check_htmuon_trailer(path: str, obj: Any, verified: bool) -> str | None:
    """An htmuon training checkpoint (its payload carries htmuon's ``format`` tag) that was not verified
    before loading -- its trailer damaged or cut, so its magic was not found -- is refused as resuming
    refuses it (:func:`htmuon.train.checkpoint.verify`, the same rules) where the trailer is there but
    damaged or the archive is cut; one that ends like a whole ``torch.save`` archive (written before
    checksums, format v1, or saved again by ``torch.save``, e.g. without its optimizer state) is read
    unverified and the returned note says so (resuming refuses a v2 one: it needs every byte it wrote).
    Other files (not htmuon's) return None: ``torch.load`` read them."""
    from pathlib import Path

    from htmuon.train import checkpoint

    fmt = obj.get("format") if isinstance(obj, Mapping) else None
    if verified or fmt not in (checkpoint.FORMAT, checkpoint.FORMAT_UNCHECKED):
        return None
    try:
        has_checksum = checkpoint.verify(Path(path))  # False: ends like a plain archive (no trailer)
    except checkpoint.CheckpointError as e:
        raise ValueError(str(e)) from None
    if has_checksum:  # (the trailer is intact after all: the file changed since the first look)
        raise ValueError(
            f"{path!r} changed while being read (a newer checkpoint written over it?): analyse it again"
        )
    if fmt == checkpoint.FORMAT:  # a whole archive without the trailer: saved again by torch.save (its
        # optimizer state dropped, say), or the trailer cut off exactly; torch.load read it whole
        return (
            f"{os.path.basename(path)}: an htmuon checkpoint without its checksum trailer (saved again "
            "with torch.save?): read unverified"
        )
    return f"{os.path.basename(path)}: no checksum (an older htmuon wrote it): read unverified"


def _holds_weights(v: Any) -> bool:
    return isinstance(v, nn.Module) or (
        isinstance(v, Mapping) and any(isinstance(t, Tensor) for t in v.values())
    )


def _find_state_dict(obj: Any) -> tuple[Mapping[str, Any] | nn.Module | None, str | None]:
    """The state_dict (or pickled module) inside a loaded object, and the key it was under: the first
    of :data:`STATE_DICT_KEYS` that holds one, else the object itself if it holds tensors."""
    if isinstance(obj, nn.Module):
        return obj, None
    if isinstance(obj, Tensor):
        return {"tensor": obj}, None
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if _holds_weights(obj.get(key)):
                return obj[key], key
        if any(isinstance(t, Tensor) for t in obj.values()):
            return obj, None
    return None, None


def _other_state_dicts(obj: Any, key: str | None) -> list[str]:
    """The other keys of :data:`STATE_DICT_KEYS` that hold weights too (ignored: the first one is used)."""
    if key is None or not isinstance(obj, Mapping):
        return []
    return [k for k in STATE_DICT_KEYS if k != key and _holds_weights(obj.get(k))]


def _is_lightning(obj: Any, key: str | None) -> bool:
    return key == "state_dict" and isinstance(obj, Mapping) and "pytorch-lightning_version" in obj


class _TorchCheckpoint(Checkpoint):
    format = "torch"

    def __init__(self, path: str, files: dict[str, str] | None = None, allow_pickle: bool = False):
        """``files``: a sharded index's ``{stored key: file}``; None for the single file ``path``."""
        self._allow_pickle = allow_pickle
        self._cache: dict[str, Mapping[str, Any]] = {}  # only for files that cannot be mmapped
        self._seen: dict[str, tuple] = {}  # file -> (inode, size, mtime) when opened (and verified)
        self._lightning = False
        self._load_notes: list[str] = []  # what reading the files found (an htmuon file without checksum)
        entries: dict[str, TensorMeta] = {}
        keys: dict[str, str] = {}
        tied: dict[str, str] = {}  # stored key -> the first stored key sharing its tensor
        notes: list[str] = []
        module = None
        for file in dict.fromkeys(files.values()) if files else [path]:
            sd, placeholders, module = self._state_dict(file, first=True)
            if placeholders:
                notes.append(
                    f"{os.path.basename(file)}: not loaded (placeholders): {', '.join(placeholders)}"
                )
            if module is not None:
                break
            views: dict[tuple, str] = {}  # (storage, offset, shape, stride, dtype) -> first key
            for k, t in sd.items():
                if isinstance(t, Tensor) and (files is None or files.get(k) == file):
                    entries[k] = TensorMeta(tuple(t.shape), t.dtype)
                    keys[k] = file
                    if t.numel():  # one storage under two names (torch.save keeps the sharing)
                        view = _storage_view(t)
                        if views.setdefault(view, k) != k:
                            tied[k] = views[view]
        if files:
            missing = [k for k in files if k not in keys]
            if missing:
                raise ValueError(
                    f"{path!r}: the index lists {missing[0]!r} in {files[missing[0]]!r}, which lacks it"
                )
        names, strip_notes = _strip_prefixes(list(entries), lightning=self._lightning)
        super().__init__(
            path, {n: entries[k] for n, k in names.items()}, self._load_notes + notes + strip_notes
        )
        self._where = {n: (keys[k], k) for n, k in names.items()}
        name_of = {k: n for n, k in names.items()}
        self.tied = {name_of[k]: name_of[first] for k, first in tied.items()}
        if module is not None:
            self.module = module
            self.format = "module"

    def _state_dict(
        self, file: str, first: bool = False
    ) -> tuple[Mapping[str, Any], list[str], nn.Module | None]:
        if file in self._cache:
            return self._cache[file], [], None
        if not os.path.isfile(file):
            raise ValueError(f"cannot read {file!r}: no such file")
        st = os.stat(file)
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        verified = False
        if first:
            verified = _verify_htmuon_checksum(file)
            self._seen[file] = seen
        elif self._seen.get(file, seen) != seen:  # re-opened per batch: not another file by that name
            raise ValueError(
                f"{file!r} changed while being read (a newer checkpoint written over it?): analyse it again"
            )
        if first and not verified and _is_zip(file):
            unchecked = _check_zip_crcs(file)
            if unchecked:
                self._load_notes.append(unchecked)
        obj, placeholders = _torch_load(file, self._allow_pickle)
        if first:
            note = _check_htmuon_trailer(file, obj, verified)
            if note:
                self._load_notes.append(note)
        sd, key = _find_state_dict(obj)
        others = _other_state_dicts(obj, key) if first else []
        if others:
            self._load_notes.append(
                f"{os.path.basename(file)}: weights under {key!r} analysed; "
                f"{', '.join(map(repr, others))} also holds weights, not analysed"
            )
        if isinstance(sd, nn.Module):
            return {}, placeholders, sd
        if sd is None:
            what = type(obj).__name__
            # a pickled model, or one under a state_dict key ({"model": model, "epoch": ...})
            held = obj if isinstance(obj, Mapping) else {}
            pickled = [k for k in STATE_DICT_KEYS if isinstance(held.get(k), _Opaque)]
            if isinstance(obj, _Opaque) or pickled:
                opaque = obj if isinstance(obj, _Opaque) else obj[pickled[0]]
                under = f" under {pickled[0]!r}" if pickled else ""
                raise ValueError(
                    f"{file!r} pickles a {opaque.qualname} object{under}, not a state_dict; loading it would "
                    "execute code from the file: if you trust it, pass allow_pickle=True (htmuon esd "
                    "--allow-pickle)"
                )
            if isinstance(obj, Mapping) and {"state", "param_groups"} <= set(obj):
                what = "dict with keys 'state', 'param_groups' (an optimizer's state_dict: no model weights)"
            elif isinstance(obj, Mapping):
                keys = [repr(k) for k in list(obj)[:8]]
                more = ", ..." if len(obj) > 8 else ""
                what = f"dict with keys {', '.join(keys)}{more}" if keys else "dict with no entries"
            raise ValueError(
                f"{file!r} holds a {what}, not a state_dict (name -> tensor) "
                f"or a dict with one under {' or '.join(map(repr, STATE_DICT_KEYS))}"
            )
        if first:
            self._lightning = self._lightning or _is_lightning(obj, key)
        if not _is_zip(file):
            self._cache[file] = sd  # legacy format: no mmap, so it stays in memory
        return sd, placeholders, None

    def _read(self, names: list[str]) -> dict[str, Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self._where[n][0], []).append(n)
        out = {}
        for file, ns in by_file.items():
            sd = self._state_dict(file)[0]  # re-opened (mmap) per call: no mapping outlives the batch
            for n in ns:
                t = sd.get(self._where[n][1])
                if not isinstance(t, Tensor):
                    raise ValueError(f"{file!r} changed while being read: no tensor {self._where[n][1]!r}")
                if t.device.type == "meta":
                    raise ValueError(
                        f"{file!r}: tensor {self._where[n][1]!r} is on the meta device and holds no values "
                        "(saved from a model built under torch.device('meta') or init_empty_weights, never "
                        "loaded)"
                    )
                out[n] = t
        return out

    def close(self) -> None:
        self._cache.clear()


# ----------------------------------------------------------------------------- DCP

#: Modules whose classes DCP's ``.metadata`` pickle may name (module -> allowed names, None = all
#: classes defined in that module).
_DCP_ALLOWED: dict[str, frozenset[str] | None] = {
    "torch.distributed.checkpoint.metadata": None,
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _DCP_ALLOWED.get(module, frozenset())
        obj = getattr(__import__(module, fromlist=[name]), name, None) if module in _DCP_ALLOWED else None
        if module == "torch" and isinstance(obj, torch.dtype):
            return obj
        if obj is not None and (name in allowed if allowed is not None else _defined_in(obj, module)):
            return obj
        raise _RefusedClass(f"DCP metadata names {module}.{name}, which is not a DCP metadata class")


class _RefusedClass(pickle.UnpicklingError):
    """A class the DCP metadata unpickler does not admit (not corruption: allow_pickle would load it)."""


def _defined_in(obj: Any, module: str) -> bool:
    return isinstance(obj, type) and obj.__module__ == module


class _DCPCheckpoint(Checkpoint):
    format = "dcp"

    def __init__(self, path: str, allow_pickle: bool = False):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta_path = os.path.join(path, DCP_METADATA)
        try:
            with open(meta_path, "rb") as f:
                meta = pickle.load(f) if allow_pickle else _DCPMetadataUnpickler(f).load()
        except _RefusedClass as e:
            raise ValueError(
                f"cannot read {meta_path!r}: {e}; if you trust the file, pass allow_pickle=True "
                "(htmuon esd --allow-pickle), which executes code from it"
            ) from e
        except Exception as e:  # a truncated or damaged pickle (plain pickle would not read it either)
            raise ValueError(
                f"cannot read {meta_path!r} as DCP metadata (corrupt or truncated?): {type(e).__name__}: {e}"
            ) from e
        md = getattr(meta, "state_dict_metadata", None)
        if not isinstance(md, Mapping):
            raise ValueError(f"{meta_path!r} is not torch.distributed.checkpoint metadata")
        tensors = {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}
        notes = []
        # {"model": state_dict, "step": ..., "optimizer": ...} saved by DCP: keys "model.<name>"
        weights = [k for k in tensors if k.endswith("weight")]
        if (
            weights
            and all(k.startswith("model.") for k in weights)
            and any(not k.startswith("model.") for k in md)
        ):
            keys = {k[len("model.") :]: k for k in tensors if k.startswith("model.")}
            notes.append("tensors under 'model.' (prefix removed)")
        else:
            keys = {k: k for k in tensors}
        names, strip_notes = _strip_prefixes(list(keys), lightning=False)
        entries = {
            n: TensorMeta(tuple(tensors[keys[k]].size), tensors[keys[k]].properties.dtype)
            for n, k in names.items()
        }
        super().__init__(path, entries, notes + strip_notes)
        self._meta = meta
        self._key = {n: keys[k] for n, k in names.items()}

    def _read(self, names: list[str]) -> dict[str, Tensor]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        meta = self._meta

        class _Reader(dcp.FileSystemReader):  # the metadata already read safely, not re-unpickled
            def read_metadata(self, *args: Any, **kwargs: Any):
                return meta

        sd = {self._key[n]: torch.empty(self.entries[n].shape, dtype=self.entries[n].dtype) for n in names}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=".*torch.distributed is disabled", category=UserWarning
                )
                if "no_dist" in inspect.signature(dcp.load).parameters:
                    dcp.load(sd, storage_reader=_Reader(self.path), no_dist=True)
                else:  # torch 2.4: only the older entry point reads without a process group
                    warnings.filterwarnings("ignore", category=FutureWarning)  # it is deprecated later
                    dcp.load_state_dict(sd, storage_reader=_Reader(self.path), no_dist=True)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            last = [ln.strip() for ln in str(e).splitlines() if ln.strip()]  # its text ends a traceback
            why = last[-1] if last else type(e).__name__
            raise ValueError(
                f"cannot read tensors from the DCP folder {self.path!r} (corrupt or truncated?): {why}"
            ) from e
        return {n: sd[self._key[n]] for n in names}


# ----------------------------------------------------------------------------- dispatch


def _refuse_lfs_pointer(path: str) -> None:
    """A one-line error for a Git LFS pointer file in place of the weights."""
    with open(path, "rb") as f:
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
            raise ValueError(
                f"cannot read {path!r}: it is a Git LFS pointer, not the weights (cloned without git lfs? "
                "run `git lfs pull` in its repository)"
            )


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path!r} as a sharded-checkpoint index: {e}") from e
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise ValueError(f"{path!r} is not a sharded-checkpoint index: no 'weight_map' {{name: shard file}}")
    folder = os.path.dirname(path)
    files = {k: os.path.join(folder, v) for k, v in wm.items()}
    for shard in dict.fromkeys(files.values()):
        if not os.path.isfile(shard):
            raise ValueError(f"{path!r} names the shard {shard!r}, which does not exist")
        _refuse_lfs_pointer(shard)
    return files


def _open_file(path: str, allow_pickle: bool) -> Checkpoint:
    if path.endswith(".index.json"):
        files = _read_index(path)
        if all(f.endswith(".safetensors") for f in files.values()):
            return _SafetensorsCheckpoint(path, files)
        return _TorchCheckpoint(path, files, allow_pickle)
    _refuse_lfs_pointer(path)
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little")  # safetensors: 8-byte header length, JSON header
    if len(head) == 9 and head[8:9] == b"{" and 0 < header_len <= os.path.getsize(path) - 8:
        return _SafetensorsCheckpoint(path, {})
    if path.endswith(".safetensors"):
        raise ValueError(
            f"cannot read {path!r} as safetensors: the file does not start with a safetensors header"
        )
    if not head.startswith(_ZIP_MAGIC) and not (head[:1] and head[0] == _PICKLE_PROTO):
        raise ValueError(
            f"cannot read {path!r}: not a safetensors file, a torch.save file or a checkpoint index "
            f"(starts with {head[:8]!r})"
        )
    return _TorchCheckpoint(path, None, allow_pickle)


def _open_folder(path: str, allow_pickle: bool) -> Checkpoint:
    for name in FOLDER_FILES:
        p = os.path.join(path, name)
        if name == DCP_METADATA and os.path.isfile(p):
            return _DCPCheckpoint(path, allow_pickle)
        if os.path.isfile(p):
            return _open_file(p, allow_pickle)
    files = sorted(os.listdir(path))
    found = [f for f in files if f.endswith(CHECKPOINT_SUFFIXES) and os.path.isfile(os.path.join(path, f))]
    indexes = [f for f in files if f.endswith(".index.json")]
    if len(indexes) == 1:
        return _open_file(os.path.join(path, indexes[0]), allow_pickle)
    if len(found) == 1:
        return _open_file(os.path.join(path, found[0]), allow_pickle)
    listing = (
        f"it holds {', '.join(found[:6])}{', ...' if len(found) > 6 else ''}: name one"
        if found
        else (f"looked for {', '.join(FOLDER_FILES)} or one *{'/*'.join(CHECKPOINT_SUFFIXES)} file")
    )
    raise ValueError(f"{path!r} is not a checkpoint folder ({listing})")


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint file or folder for :func:`~htmuon.diagnostics.analyze` (see module doc).

    Args:
        path: a Hugging Face model folder, a DCP folder, an htmuon run folder, a ``.safetensors``
            file, a sharded-checkpoint ``*.index.json``, or a ``torch.save`` file (``.pt``, ``.pth``,
            ``.bin``, Lightning ``.ckpt``).
        allow_pickle: load pickled Python objects (a ``torch.save(model)`` file, DCP metadata with
            foreign classes) with plain pickle. This executes code from the file: only for files you
            trust.

    Returns:
        A :class:`Checkpoint`; no weight has been loaded yet.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the path, when it is none of the formats, is corrupt, or (without
            ``allow_pickle``) needs code from the file to be loaded.

    Example:
        >>> with open_checkpoint("runs/llama") as ckpt:  # doctest: +SKIP
        ...     report = analyze(ckpt)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    if os.path.isdir(path):
        return _open_folder(path, allow_pickle)
    try:
        return _open_file(path, allow_pickle)
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or e}") from e
