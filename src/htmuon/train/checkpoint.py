"""Atomic, resumable checkpoints.

A checkpoint holds the model, the optimizer, the step, the RNG states (torch, CUDA, numpy,
python), the data loader's position, the elapsed time, the config and the versions. It is
written to a temp file in the run folder, fsynced, then ``os.replace``d over ``ckpt.pt``, so
a run killed at any moment leaves either the previous checkpoint or the new one, never a torn
file. Only plain containers and tensors are stored, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from htmuon.cli import UserError
from htmuon.train.data import atomic_write

FORMAT = "htmuon-train-checkpoint-v1"
CKPT_NAME = "ckpt.pt"


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


def save(path: Path, payload: dict) -> None:
    """torch.save to a temp file beside ``path``, fsync, os.replace (atomic on POSIX and Windows)."""
    payload = {"format": FORMAT, **payload}
    atomic_write(path, lambda f: torch.save(payload, f))


def load(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise UserError(f"no checkpoint at '{path}'")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"'{path}' is not an htmuon training checkpoint")
    return payload
