"""Atomic, checksummed, resumable checkpoints.

A checkpoint holds the model, the optimizer, the step, the RNG states (torch, CUDA, numpy,
python), the data loader's position, the elapsed time, the config and the versions. Only plain
containers and tensors are stored, so it loads with ``weights_only=True``.

File format: ``torch.save``'s archive followed by an 80-byte trailer,

    b"\nhtmuon-sha256:" + sha256(archive).hexdigest() + b"\n"

``torch.load`` still reads the file as it is (it finds the archive's directory from the end); :func:`load`
first checks the SHA-256 of the archive against the trailer, so any changed byte -- in the archive or
in the trailer -- is a :class:`CheckpointError`, never a silent resume.

Writing: to a temp file in the run folder, fsynced, then ``os.replace``d over ``ckpt.pt``; just
before, the old ``ckpt.pt`` becomes ``ckpt.prev.pt``. A run killed at any moment leaves the
previous checkpoint or the new one, never a torn ``ckpt.pt``; and if ``ckpt.pt`` is later found
damaged (a disk error, a copy cut short), :func:`load_latest` falls back to ``ckpt.prev.pt``.
Checkpoints from before the checksum (format tag v1, no trailer: the file ends like a plain
``torch.save`` archive) are accepted unverified, with a note; a v2 checkpoint that ends like a plain
archive lost its trailer (a file cut at exactly that point) and is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from htmuon.errors import UserError
from htmuon.train.data import atomic_write

#: the format tag of the checkpoints written now: always followed by the checksum trailer
FORMAT = "htmuon-train-checkpoint-v2"
#: the tag of checkpoints written before the checksum existed (loaded unverified, with a note). A v2
#: file without its trailer is refused: its trailer was cut off, so its content cannot be trusted.
FORMAT_UNCHECKED = "htmuon-train-checkpoint-v1"
CKPT_NAME = "ckpt.pt"
#: the checkpoint before the latest one (the fallback of :func:`load_latest`)
PREV_NAME = "ckpt.prev.pt"
#: a damaged ``ckpt.pt`` is moved here on a fallback, so the next save cannot rotate it over the good one
CORRUPT_SUFFIX = ".corrupt"
TRAILER_MAGIC = b"\nhtmuon-sha256:"
TRAILER_LEN = len(TRAILER_MAGIC) + 64 + 1
_ZIP_END = b"PK\x05\x06"  # a zip end-of-central-directory record: the last 22 bytes of torch.save's archive
_CHUNK = 1 << 22


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, truncated, or its content fails the checksum."""


def rng_state() -> dict:
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global state is what we save)
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _HashingWriter:
    """A write-only file that hashes what passes through; keeps the ``OSError`` of the real write
    (``torch.save`` turns it into a RuntimeError ``enforce fail at inline_container.cc``)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.error = f, hashlib.sha256(), None

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def _write(payload: dict, f: BinaryIO) -> None:
    w = _HashingWriter(f)
    try:
        torch.save(payload, w)
    except RuntimeError:
        if w.error is not None:
            raise w.error from None
        raise
    f.write(TRAILER_MAGIC + w.sha.hexdigest().encode("ascii") + b"\n")


def save(path: str | Path, payload: dict) -> None:
    """Write ``payload`` (plus its format tag and checksum trailer) to ``path`` atomically; the old
    ``path`` becomes ``ckpt.prev.pt`` beside it.

    Raises:
        UserError: the file cannot be written (disk full, read-only, no permission), naming it.
    """
    path = Path(path)
    payload = {"format": FORMAT, **payload}
    try:
        atomic_write(path, lambda f: _write(payload, f), backup=path.with_name(PREV_NAME))
    except OSError as e:
        raise UserError(f"cannot write checkpoint '{path}': {e.strerror or e}") from None


def verify(path: Path) -> bool:
    """Check ``path``'s checksum: True if it matches, False for a checkpoint without one (written
    before checksums; only when the file ends exactly like a ``torch.save`` archive).

    Raises:
        CheckpointError: missing, unreadable, truncated, or the content does not match the checksum.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size >= 22:
                f.seek(size - 22)
                if f.read(4) == _ZIP_END:
                    return False
            if size <= TRAILER_LEN:
                raise CheckpointError(f"checkpoint '{path}' is truncated ({size} bytes)")
            sha, left = hashlib.sha256(), size - TRAILER_LEN
            f.seek(0)
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise CheckpointError(f"checkpoint '{path}' is truncated")
                sha.update(chunk)
                left -= len(chunk)
            trailer = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint '{path}': {e.strerror or e}") from None
    if not trailer.startswith(TRAILER_MAGIC) or not trailer.endswith(b"\n"):
        raise CheckpointError(f"checkpoint '{path}' is damaged or truncated (no checksum trailer at its end)")
    if trailer[len(TRAILER_MAGIC) : -1] != sha.hexdigest().encode("ascii"):
        raise CheckpointError(f"checkpoint '{path}' is corrupt: its content does not match its SHA-256")
    return True


def load(path: str | Path, map_location="cpu") -> dict:
    """The payload of the checkpoint at ``path`` (a path or a string), after :func:`verify`.

    Raises:
        CheckpointError: missing, corrupt or not an htmuon training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'")
    return _torch_load(path, map_location, verify(path))


#: Builtins that torch >= 2.6's weights-only unpickler takes and torch 2.4-2.5's refuse; optimizer states
#: hold them (heavyball's ``cadamw`` keeps a set in its state_dict), so a checkpoint written on torch 2.5
#: must also load there. Allowed for this load only; on newer torch this changes nothing.
_BUILTINS = (set, complex)


@contextlib.contextmanager
def allowed_globals(entries: list) -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` take ``entries`` (what ``add_safe_globals`` takes) inside the
    block only: torch's ``safe_globals`` from torch 2.5; on torch 2.4, which has no such context, its
    process-wide allowlist, restored afterwards."""
    allow = getattr(torch.serialization, "safe_globals", None)
    if allow is not None:
        with allow(entries):
            yield
        return
    saved = list(torch.serialization.get_safe_globals())  # torch 2.4 returns its own list: copied
    torch.serialization.add_safe_globals(entries)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def _weights_only_load(path: Path, map_location):
    with allowed_globals(list(_BUILTINS)):
        return torch.load(path, map_location=map_location, weights_only=True)


def _torch_load(path: Path, map_location, verified: bool) -> dict:
    try:
        payload = _weights_only_load(path, map_location)
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, FORMAT_UNCHECKED):
        raise CheckpointError(f"'{path}' is not an htmuon training checkpoint")
    if not verified and payload["format"] == FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' lost its checksum trailer (cut short?): its content cannot be verified"
        )
    return payload


def load_latest(folder: Path, map_location="cpu") -> tuple[dict | None, Path | None, list[str]]:
    """The newest usable checkpoint in a run folder: ``ckpt.pt``, else ``ckpt.prev.pt``.

    Returns:
        ``(payload, path, notes)``: ``(None, None, [])`` when the folder holds no checkpoint;
        ``notes`` are one-line messages for the user (a damaged file skipped, a file without checksum).

    Raises:
        CheckpointError: checkpoints exist but none is usable (naming each and why).
    """
    notes, errors = [], []
    for path in (folder / CKPT_NAME, folder / PREV_NAME):
        if not path.is_file():
            if path.exists() or path.is_symlink():  # a folder, a link to nothing: not "killed while rotating"
                errors.append(f"checkpoint '{path}' is not a file")
            continue
        try:
            verified = verify(path)
            payload = _torch_load(path, map_location, verified)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            step = payload["step"]
            notes.append(f"{errors[0]}; resuming from the previous checkpoint '{path}' (step {step})")
        elif path.name == PREV_NAME:
            notes.append(f"no '{CKPT_NAME}' in '{folder}' (killed while rotating); resuming from '{path}'")
        if not verified:
            notes.append(f"checkpoint '{path}' has no checksum (an older htmuon wrote it): loaded unverified")
        return payload, path, notes
    if errors:
        them = "it" if len(errors) == 1 else "them"
        raise CheckpointError(
            "; ".join(errors) + f"; no usable checkpoint is left: delete {them} and run again with --resume "
            "to start the run over from step 0, or pick another --out-dir"
        )
    return None, None, []


def set_aside_corrupt(folder: Path) -> Path | None:
    """Rename a damaged ``ckpt.pt`` to ``ckpt.pt.corrupt`` (after :func:`load_latest` fell back), so the
    next save does not rotate it over ``ckpt.prev.pt`` (or, not a file, fail to replace it after the
    steps since); returns the new name, or None if there was none."""
    path = folder / CKPT_NAME
    if not (path.exists() or path.is_symlink()):
        return None
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    os.replace(path, target)
    return target
