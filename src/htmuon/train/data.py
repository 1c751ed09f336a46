"""Data for the harness: text corpora -> train/validation token streams; image datasets.

Text sources (``TrainConfig.data`` for a LLaMA model)::

    shakespeare            the built-in corpus (src/htmuon/data/shakespeare.txt.gz; offline, default)
    PATH.txt / PATH.md     a UTF-8 text file: one document
    PATH.jsonl             one JSON object per line; the ``text_field`` key holds a document
    DIR                    every *.txt file under DIR (sorted): one document each
    hf:NAME[:CONFIG]       a Hugging Face ``datasets`` hub dataset (needs the network and
                           ``pip install htmuon[datasets]``); e.g. ``hf:allenai/c4:en``
    hf-disk:PATH           a dataset saved with ``Dataset.save_to_disk`` / a local dataset folder

Train/validation split (deterministic, independent of the seed): every document is cut into
chunks of about ``CHUNK_CHARS`` characters at line boundaries; chunks are numbered in order
across the corpus and every ``round(1 / val_fraction)``-th chunk is held out for validation.
A Hugging Face dataset with its own validation split uses that split instead.

Image sources (for a ResNet model): ``digits`` (scikit-learn's bundled 8x8 digits; offline,
default), ``cifar10:DIR`` and ``cifar100:DIR`` (the standard python-pickle batches,
``cifar-10-batches-py`` / ``cifar-100-python``; the test batch is the validation split).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from htmuon.cli import UserError

BUILTIN_CORPORA = {"shakespeare": "shakespeare.txt.gz"}
CHUNK_CHARS = 8192
IMAGE_SOURCES = ("digits", "cifar10", "cifar100")


def builtin_corpus_path(name: str = "shakespeare") -> Path:
    return Path(__file__).resolve().parent.parent / "data" / BUILTIN_CORPORA[name]


# ----------------------------------------------------------------------------- text sources


def load_documents(source: str, text_field: str = "text", max_docs: int = 0) -> dict[str, list[str]]:
    """Read a text source; returns {"train": docs, "val": docs} or {"all": docs} (split later)."""
    if source in BUILTIN_CORPORA:
        with gzip.open(builtin_corpus_path(source), "rt", encoding="utf-8") as f:
            return {"all": [f.read()]}
    if source.startswith("hf:") or source.startswith("hf-disk:"):
        return _load_hf(source, text_field, max_docs)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"data source '{source}' not found (a built-in corpus {sorted(BUILTIN_CORPORA)}, "
            "a .txt/.jsonl file, a folder of .txt files, hf:NAME or hf-disk:PATH)"
        )
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"data folder '{source}' holds no .txt files")
        docs = [_read_text(f) for f in files]
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path, text_field)
    else:
        docs = [_read_text(path)]
    docs = [d for d in docs if d.strip()]
    if max_docs:
        docs = docs[:max_docs]
    if not docs:
        raise UserError(f"data source '{source}' is empty")
    return {"all": docs}


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read data file '{path}': {e.strerror}") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise UserError(f"{path}:{lineno}: expected an object with a string field '{text_field}'")
        docs.append(obj[text_field])
    return docs


def _load_hf(source: str, text_field: str, max_docs: int) -> dict[str, list[str]]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"data source '{source}' needs the Hugging Face datasets library: pip install htmuon[datasets]"
        ) from None
    if source.startswith("hf-disk:"):
        path = source[len("hf-disk:") :]
        if not Path(path).exists():
            raise UserError(f"dataset folder '{path}' not found")
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError:
            ds = datasets.load_dataset(path)
        splits = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    else:
        name, _, cfg = source[len("hf:") :].partition(":")
        # streaming: read only the first max_docs documents of each split
        try:
            ds = datasets.load_dataset(name, cfg or None, streaming=True)
        except Exception as e:  # network / unknown dataset: a user-facing one-liner
            raise UserError(f"cannot load dataset '{name}': {type(e).__name__}: {e}") from None
        splits = dict(ds)
    out: dict[str, list[str]] = {}
    for want, names in (("train", ("train",)), ("val", ("validation", "valid", "val", "test"))):
        for n in names:
            if n in splits:
                docs = []
                for row in splits[n]:
                    if text_field not in row:
                        raise UserError(f"dataset '{source}' has no field '{text_field}' (use --text-field)")
                    docs.append(row[text_field])
                    if max_docs and len(docs) >= max_docs:
                        break
                out[want] = docs
                break
    if "train" not in out:
        raise UserError(f"dataset '{source}' has no train split (splits: {sorted(splits)})")
    if "val" not in out:
        return {"all": out["train"]}
    return out


def chunk_document(doc: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut a document into consecutive pieces of about ``chunk_chars`` at line boundaries."""
    chunks, start, n = [], 0, len(doc)
    while start < n:
        end = min(start + chunk_chars, n)
        if end < n:
            nl = doc.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        chunks.append(doc[start:end])
        start = end
    return chunks


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[list[str]], list[list[str]]]:
    """Deterministic split: every k-th chunk (k = round(1/val_fraction)) goes to validation.

    Returns (train, val) as lists of documents, each a list of chunks (chunks of one
    document stay in order and are joined without a document separator).
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    k = max(2, round(1.0 / val_fraction))
    train: list[list[str]] = []
    val: list[list[str]] = []
    i = 0
    for doc in docs:
        tr, va = [], []
        for chunk in chunk_document(doc):
            (va if i % k == k - 1 else tr).append(chunk)
            i += 1
        if tr:
            train.append(tr)
        if va:
            val.append(va)
    if not val:
        # fewer than k chunks: hold out the last one
        last = train[-1].pop()
        val.append([last])
        if not train[-1]:
            train.pop()
    if not train:
        raise UserError("the corpus is too small to split into train and validation")
    return train, val


@dataclass
class TextSplits:
    train: list[list[str]]  # documents, each a list of chunks
    val: list[list[str]]

    @property
    def train_text_for_hash(self) -> str:
        return "\x1e".join("".join(d) for d in self.train)

    @property
    def val_text_for_hash(self) -> str:
        return "\x1e".join("".join(d) for d in self.val)


def text_splits(source: str, val_fraction: float, text_field: str = "text", max_docs: int = 0) -> TextSplits:
    loaded = load_documents(source, text_field, max_docs)
    if "all" in loaded:
        tr, va = split_documents(loaded["all"], val_fraction)
    else:
        tr = [chunk_document(d) for d in loaded["train"] if d.strip()]
        va = [chunk_document(d) for d in loaded["val"] if d.strip()]
        if not tr or not va:
            raise UserError(f"data source '{source}' has an empty train or validation split")
    return TextSplits(tr, va)


# ----------------------------------------------------------------------------- batching


class BlockSampler:
    """Epoch-wise shuffled, non-overlapping blocks; its whole state is (epoch, index).

    The permutation of epoch e is drawn from numpy's PCG64 seeded with (seed, e), so a
    resumed run draws exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int):
        if n_items < 1:
            raise UserError("the training split is smaller than one sequence; use a shorter --seq-len")
        self.n, self.batch_size, self.seed = n_items, batch_size, seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self) -> np.ndarray:
        out = []
        need = self.batch_size
        while need:
            take = min(need, self.n - self.index)
            out.append(self._perm[self.index : self.index + take])
            self.index += take
            need -= take
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise UserError("the checkpoint's data position does not match this dataset")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation(self.epoch)


class TokenData:
    """Train/val token streams for a causal LM; batches of (input, target) of length seq_len."""

    def __init__(
        self, train_tokens: np.ndarray, val_tokens: np.ndarray, seq_len: int, batch_size: int, seed: int
    ):
        self.train_tokens = torch.from_numpy(train_tokens.astype(np.int64))
        self.val_tokens = torch.from_numpy(val_tokens.astype(np.int64))
        self.seq_len, self.batch_size = seq_len, batch_size
        self.sampler = BlockSampler((len(train_tokens) - 1) // seq_len, batch_size, seed)
        if (len(val_tokens) - 1) // seq_len < 1:
            raise UserError("the validation split is smaller than one sequence; use a shorter --seq-len")

    def _blocks(self, tokens: torch.Tensor, starts) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        idx = torch.as_tensor(np.asarray(starts), dtype=torch.long)[:, None] * T + torch.arange(T + 1)
        blk = tokens[idx]
        return blk[:, :-1].contiguous(), blk[:, 1:].contiguous()

    def next_batch(self):
        return self._blocks(self.train_tokens, self.sampler.next_indices())

    def val_batches(self, max_batches: int = 0, window: int = 0):
        """Held-out batches: all, or ``max_batches`` from window number ``window`` (wrapping around)."""
        n = (len(self.val_tokens) - 1) // self.seq_len
        starts = np.arange(n)
        if max_batches:
            k = min(n, max_batches * self.batch_size)
            starts = np.roll(starts, -((window * k) % n))[:k]
        for i in range(0, len(starts), self.batch_size):
            yield self._blocks(self.val_tokens, starts[i : i + self.batch_size])

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len


class ImageData:
    """In-memory image classification data (N, C, H, W) float32, normalised per channel."""

    def __init__(self, x_train, y_train, x_val, y_val, num_classes: int, batch_size: int, seed: int):
        self.x_train, self.y_train = x_train, y_train
        self.x_val, self.y_val = x_val, y_val
        self.num_classes, self.batch_size = num_classes, batch_size
        self.in_channels = x_train.shape[1]
        self.sampler = BlockSampler(len(x_train), batch_size, seed)

    def next_batch(self):
        idx = torch.as_tensor(self.sampler.next_indices(), dtype=torch.long)
        return self.x_train[idx], self.y_train[idx]

    def val_batches(self, max_batches: int = 0, window: int = 0):
        """Held-out batches: all, or ``max_batches`` from window number ``window`` (wrapping around)."""
        n = len(self.x_val)
        idx = torch.arange(n)
        if max_batches:
            k = min(n, max_batches * self.batch_size)
            idx = torch.roll(idx, -((window * k) % n))[:k]
        for i in range(0, len(idx), self.batch_size):
            j = idx[i : i + self.batch_size]
            yield self.x_val[j], self.y_val[j]

    @property
    def tokens_per_batch(self) -> int:  # samples per batch (the progress bar's throughput unit)
        return self.batch_size


def parse_image_source(source: str) -> tuple[str, str | None]:
    name, _, path = source.partition(":")
    if name not in IMAGE_SOURCES:
        raise UserError(f"unknown image dataset '{source}' (choose digits, cifar10:DIR or cifar100:DIR)")
    if name == "digits":
        return name, None
    if not path:
        raise UserError(f"image dataset '{name}' needs a local folder: --data {name}:DIR")
    if not Path(path).expanduser().is_dir():
        raise UserError(f"{name} folder '{path}' not found (the python-pickle batches are expected there)")
    return name, str(Path(path).expanduser())


def _normalise(x_train: np.ndarray, x_val: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return (
        torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
        torch.from_numpy(((x_val - mean) / std).astype(np.float32)),
    )


#: Held-out share of scikit-learn's digits (a fixed split, independent of the run's seed).
DIGITS_VAL_FRACTION = 0.2


def load_image_data(source: str, batch_size: int, seed: int) -> ImageData:
    name, path = parse_image_source(source)
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise UserError("the digits dataset needs scikit-learn: pip install htmuon[train]") from None
        d = load_digits()
        x = d.images.astype(np.float64)[:, None] / 16.0
        y = d.target.astype(np.int64)
        # fixed split, independent of the run's seed
        perm = np.random.default_rng(12345).permutation(len(x))
        n_val = round(len(x) * DIGITS_VAL_FRACTION)
        vi, ti = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        xt, xv = _normalise(x[ti], x[vi])
        return ImageData(xt, torch.from_numpy(y[ti]), xv, torch.from_numpy(y[vi]), 10, batch_size, seed)
    xt, yt, xv, yv, k = _load_cifar(name, Path(path))
    xt_t, xv_t = _normalise(xt.astype(np.float64) / 255.0, xv.astype(np.float64) / 255.0)
    return ImageData(xt_t, torch.from_numpy(yt), xv_t, torch.from_numpy(yv), k, batch_size, seed)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"CIFAR batch file '{path}' not found")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:
        raise UserError(f"cannot read CIFAR batch '{path}': {type(e).__name__}: {e}") from None


def _load_cifar(name: str, root: Path):
    # accept the archive's folder itself or its parent
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if (root / sub).is_dir():
        root = root / sub
    if name == "cifar10":
        train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, k = [root / "test_batch"], b"labels", 10
    else:
        train_files, test_files, label_key, k = [root / "train"], [root / "test"], b"fine_labels", 100

    def read(files):
        xs, ys = [], []
        for f in files:
            d = _unpickle(f)
            if b"data" not in d or label_key not in d:
                raise UserError(f"CIFAR batch '{f}' lacks '{label_key.decode()}' or 'data' (wrong dataset?)")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    xt, yt = read(train_files)
    xv, yv = read(test_files)
    return xt, yt, xv, yv, k


def atomic_write(path: Path, write: Callable[[BinaryIO], object], backup: Path | None = None) -> None:
    """``write(f)`` into a temp file beside ``path``, fsync, ``os.replace`` (atomic on POSIX and
    Windows), then fsync the folder so the rename is durable. A crash at any point leaves the old
    file or the new one, never a torn one; the temp file is removed on error (a killed process
    leaves it: ``.NAME.tmpPID``, see :func:`stale_temp_files`).

    Args:
        path: the file to (re)place.
        write: called once with the temp file, opened ``"wb"``.
        backup: if given and ``path`` exists, the old ``path`` becomes ``backup`` just before the new
            one replaces it (a hard link, so ``path`` is never missing; a rename where the file
            system has no hard links).

    Raises:
        OSError: the folder cannot be created or written (e.g. ``ENOSPC``, ``EROFS``, ``EACCES``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if backup is not None and path.exists():
            _keep_as(path, backup)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _keep_as(path: Path, backup: Path) -> None:
    """Make ``backup`` a copy of ``path`` atomically, leaving ``path`` in place where possible."""
    link = backup.with_name(f".{backup.name}.tmp{os.getpid()}")
    try:
        os.link(path, link)
    except OSError:  # no hard links here (some network / FAT file systems): move it instead
        os.replace(path, backup)
        return
    try:
        os.replace(link, backup)
    finally:
        if link.exists():
            link.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # no directory fsync on this platform
        pass


def stale_temp_files(folder: Path) -> list[Path]:
    """Temp files that :func:`atomic_write` left in ``folder`` when its process was killed
    (``.NAME.tmpPID``; up to a whole checkpoint each)."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.glob(".*.tmp*"):
        head, _, pid = p.name.rpartition(".tmp")
        if head and pid.isdigit() and p.is_file():
            out.append(p)
    return sorted(out)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda f: f.write(data))
