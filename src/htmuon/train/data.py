"""Data for the harness: text corpora -> train/validation token streams; image datasets.

Text sources (``TrainConfig.data`` for a language model)::

    shakespeare            the built-in corpus (src/htmuon/data/shakespeare.txt.gz; offline, default)
    PATH.txt[.gz] / .md    a UTF-8 text file (a leading byte-order mark dropped): one document
    PATH.jsonl[.gz]        one JSON object per line (also .json[.gz], as C4's shards); the
                           ``text_field`` key holds a document
    DIR                    every .txt/.txt.gz/.jsonl/.jsonl.gz/.json.gz file under DIR (sorted;
                           hidden files and folders skipped, symlinked folders followed)
    hf:NAME[:CONFIG]       a Hugging Face ``datasets`` hub dataset, streamed (needs the network and
                           ``pip install htmuon[datasets]``); e.g. ``hf:allenai/c4:en``
    hf-cache:NAME[:CONFIG] the same from the local ``datasets`` cache only (offline)
    hf-disk:PATH           a dataset saved with ``Dataset.save_to_disk`` / a local dataset folder

Train/validation split (deterministic, independent of the seed): every document is cut into
chunks of about ``CHUNK_CHARS`` characters at line boundaries; chunks are numbered in order
across the corpus and every ``round(1 / val_fraction)``-th chunk is held out for validation.
A Hugging Face dataset with its own validation split uses that split instead.

The training loop's path is the streaming one (:func:`load_token_data`): sources are read
document by document and tokenised batch by batch into an on-disk token cache that training
samples through ``np.memmap``; :func:`text_splits` is the same split held in memory.

Image sources (for a ResNet / ViT): ``digits`` (scikit-learn's bundled 8x8 digits; offline,
default), ``cifar10:DIR`` and ``cifar100:DIR`` (the standard python-pickle batches,
``cifar-10-batches-py`` / ``cifar-100-python``; the test batch is the validation split; training
batches cropped and flipped), ``imagenet:DIR[@SIZE]`` (an ImageFolder tree, decoded per batch).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pickle
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from htmuon.cli import UserError
from htmuon.train.locks import _unheld, acquire_lock, lock_is_stale, release_lock

BUILTIN_CORPORA = {"shakespeare": "shakespeare.txt.gz"}
CHUNK_CHARS = 8192
IMAGE_SOURCES = ("digits", "cifar10", "cifar100", "imagenet")


def builtin_corpus_path(name: str = "shakespeare") -> Path:
    return Path(__file__).resolve().parent.parent / "data" / BUILTIN_CORPORA[name]


# ----------------------------------------------------------------------------- text sources


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


def _holdout_period(val_fraction: float) -> int:
    """k: every k-th chunk is held out (k >= 2: a val_fraction above 1/2, such as 0.7, held out 0.5)."""
    if not 0.0 < val_fraction <= 0.5:
        raise UserError(
            f"val_fraction must be in (0, 0.5] (every round(1/val_fraction)-th chunk is held out), "
            f"got {val_fraction}"
        )
    return round(1.0 / val_fraction)


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
    """The training loop's split of a text source, held in memory: the documents, chunks and split of
    :func:`load_token_data`'s streaming path (:func:`iter_documents`, :func:`stream_split`), each split
    a list of documents, each a list of chunks. The in-memory reader it replaces dropped
    whitespace-only files, counted ``max_docs`` differently and read only a folder's ``.txt`` files."""
    below = count_chunks_below(source, text_field, max_docs, _holdout_period(val_fraction))
    done: dict[str, list[list[str]]] = {"train": [], "val": []}
    current: dict[str, list[str]] = {"train": [], "val": []}
    for split, chunk in stream_split(iter_documents(source, text_field, max_docs), val_fraction, below):
        if chunk is not None:
            current[split].append(chunk)
        elif current[split]:  # the end of a document's part in this split
            done[split].append(current[split])
            current[split] = []
    if not done["train"] or not done["val"]:
        raise UserError(f"data source '{source}' is empty or too small to split into train and validation")
    return TextSplits(done["train"], done["val"])


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
    """Train/val token streams for a causal LM; batches of (input, target) of length seq_len.

    The streams may be in-memory arrays or ``np.memmap``s of a token cache on disk (the streaming
    path, :func:`load_token_data`): only the sampled windows are read and widened to int64.
    """

    def __init__(
        self, train_tokens: np.ndarray, val_tokens: np.ndarray, seq_len: int, batch_size: int, seed: int
    ):
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens
        self.seq_len, self.batch_size = seq_len, batch_size
        for split, tokens in (("training", train_tokens), ("validation", val_tokens)):
            if (len(tokens) - 1) // seq_len < 1:
                raise UserError(
                    f"the {split} split ({len(tokens):,} tokens) is smaller than one sequence of "
                    f"--seq-len {seq_len} (+1 for the targets); use a shorter --seq-len"
                )
        self.sampler = BlockSampler((len(train_tokens) - 1) // seq_len, batch_size, seed)

    def _blocks(self, tokens: np.ndarray, starts) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        idx = np.asarray(starts, dtype=np.int64)[:, None] * T + np.arange(T + 1)
        blk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
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


#: CIFAR augmentation: zero padding (the mean, after normalisation) before the random crop.
CIFAR_CROP_PADDING = 4


class ImageData:
    """In-memory image classification data (N, C, H, W) float32, normalised per channel.

    With ``augment`` (CIFAR), each training image is randomly cropped from its 4-pixel zero-padded
    version and flipped horizontally with probability 1/2 (the standard CIFAR augmentation), drawn
    from ``(seed, epoch, position)`` so a resumed run sees the same pixels.
    """

    def __init__(
        self,
        x_train,
        y_train,
        x_val,
        y_val,
        num_classes: int,
        batch_size: int,
        seed: int,
        augment: bool = False,
    ):
        self.x_train, self.y_train = x_train, y_train
        self.x_val, self.y_val = x_val, y_val
        self.num_classes, self.batch_size = num_classes, batch_size
        self.in_channels = x_train.shape[1]
        self.seed, self.augment = seed, augment
        self.sampler = BlockSampler(len(x_train), batch_size, seed)

    def next_batch(self):
        epoch, position = self.sampler.epoch, self.sampler.index
        idx = torch.as_tensor(self.sampler.next_indices(), dtype=torch.long)
        x = self.x_train[idx]
        if self.augment:
            x = self._crop_and_flip(x, np.random.default_rng([self.seed, epoch, position]))
        return x, self.y_train[idx]

    @staticmethod
    def _crop_and_flip(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        pad = CIFAR_CROP_PADDING
        b, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy, dx = rng.integers(0, 2 * pad + 1, size=(2, b))
        flips = rng.random(b) < 0.5
        out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
        out[torch.from_numpy(flips)] = out[torch.from_numpy(flips)].flip(-1)
        return out

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

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_val(self) -> int:
        return len(self.x_val)


def parse_image_source(source: str) -> tuple[str, str | None]:
    name, _, path = source.partition(":")
    if name not in IMAGE_SOURCES:
        raise UserError(
            f"unknown image dataset '{source}' "
            "(choose digits, cifar10:DIR, cifar100:DIR or imagenet:DIR[@SIZE])"
        )
    if name == "digits":
        return name, None
    if not path:
        raise UserError(f"image dataset '{name}' needs a local folder: --data {name}:DIR")
    if name == "imagenet":
        return name, path
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


def load_image_data(source: str, batch_size: int, seed: int) -> ImageData | ImageFolderData:
    if source.partition(":")[0] == "imagenet":
        root, size = parse_imagenet_source(source)
        return ImageFolderData(root, size, batch_size, seed)
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
    return ImageData(
        xt_t, torch.from_numpy(yt), xv_t, torch.from_numpy(yv), k, batch_size, seed, augment=True
    )


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
            x, y = _cifar_arrays(f, _unpickle(f), label_key, k)
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    xt, yt = read(train_files)
    xv, yv = read(test_files)
    return xt, yt, xv, yv, k


def _cifar_arrays(f: Path, d, label_key: bytes, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR batch's (data, labels), checked: ``data`` N x 3072 bytes (each row 1024 red, 1024 green,
    1024 blue values, row by row), ``labels`` N integers in [0, k). Anything else is a one-line error
    naming the file, never a silent reinterpretation (an N x 32 x 32 x 3 array reshaped as channels
    first, floats cast to bytes) or a crash in the middle of training."""
    what = f"CIFAR batch '{f}'"
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise UserError(f"{what} lacks '{label_key.decode()}' or 'data' (wrong dataset?)")
    x, y = np.asarray(d[b"data"]), np.asarray(d[label_key])
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] == 0:
        raise UserError(f"{what}: 'data' has shape {x.shape}, expected (N, 3072), N >= 1 (32x32 RGB rows)")
    if not np.issubdtype(x.dtype, np.integer):
        raise UserError(f"{what}: 'data' holds {x.dtype} values, expected bytes 0..255 (uint8)")
    if x.dtype != np.uint8 and (int(x.min()) < 0 or int(x.max()) > 255):
        bad = int(x.min()) if int(x.min()) < 0 else int(x.max())
        raise UserError(f"{what}: 'data' holds the value {bad}, expected bytes 0..255 (uint8)")
    name = label_key.decode()
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{what}: '{name}' has shape {y.shape} ({y.dtype}), expected {len(x)} integer labels")
    if int(y.min()) < 0 or int(y.max()) >= k:
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise UserError(f"{what}: label {bad} in '{name}' is outside 0..{k - 1}")
    return x.astype(np.uint8), y.astype(np.int64)


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


# ----------------------------------------------------------------------------- streaming LM data
#
# The LM data path of the loop: a text source is read document by document (a large text file in
# blocks), cut into CHUNK_CHARS chunks (split by stream_split's rule), tokenised in batches of
# chunks and appended to train.bin / val.bin (uint16, or uint32 for vocabularies over 65535) in a
# temporary folder that is renamed into the cache when complete; training then samples windows of
# np.memmap views of those files. Neither the corpus nor its tokens are held in memory.

#: Format of the streamed token cache (part of its key).
TOKEN_STREAM_VERSION = "token-stream-v1"
#: Chunks tokenised per batch (about 2 MB of text).
ENCODE_BATCH_CHUNKS = 256
#: Characters read from a text file at a time.
READ_BLOCK_CHARS = 1 << 20
#: The local BPE is trained on at most this many characters of the train split (its first ones).
BPE_TRAIN_MAX_CHARS = 200_000_000
#: Files of a data folder that are read (sorted by path; any case: ``.TXT`` too).
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz")
#: Suffixes read as JSON lines. A ``.json`` file is read as JSON lines when it is the source itself
#: (an uncompressed C4 shard), never as text; a folder's ``.json`` files are not read (metadata).
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".json")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    known = sorted({*TEXT_SUFFIXES, *JSONL_SUFFIXES}, key=len, reverse=True)
    return next((s for s in known if name.endswith(s)), path.suffix.lower())


def _open_text(path: Path):
    # utf-8-sig: a leading byte-order mark (Windows editors write one) is dropped, not read as text
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _visible_files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted by path: symlinked folders are followed (each real folder
    once, under the first of its paths in sorted order); hidden files and folders (a name starting
    with '.': ``.ipynb_checkpoints/``, macOS's ``._NAME`` resource forks, ``.git/``) are skipped."""
    out, seen = [], set()
    for here, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # (sorted: which link is kept)
        out += [Path(here, f) for f in files if not f.startswith(".")]
    return sorted(f for f in out if f.is_file())


def iter_file_chunks(path: Path, chunk_chars: int = CHUNK_CHARS, block_chars: int = READ_BLOCK_CHARS):
    """The chunks of :func:`chunk_document` for one text file (one document), read in blocks."""
    buf, eof = "", False
    try:
        with _open_text(path) as f:
            while True:
                while not eof and len(buf) <= chunk_chars:
                    block = f.read(block_chars)
                    eof = not block
                    buf += block
                if not buf:
                    return
                end = min(chunk_chars, len(buf))
                if end < len(buf):
                    nl = buf.rfind("\n", 0, end)
                    if nl > 0:
                        end = nl + 1
                yield buf[:end]
                buf = buf[end:]
    except UnicodeDecodeError as e:
        raise UserError(f"data file '{path}' is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UserError(f"cannot read data file '{path}': {e.strerror or e}") from None
    except (EOFError, zlib.error) as e:  # a truncated (an interrupted download) or damaged .gz
        raise UserError(f"data file '{path}' is damaged or truncated ({type(e).__name__}: {e})") from None


def _iter_jsonl(path: Path, text_field: str):
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {_json_type(obj)}")
                if text_field not in obj:
                    keys = ", ".join(f"'{k}'" for k in list(obj)[:8]) or "none"
                    raise UserError(
                        f"{path}:{lineno}: no field '{text_field}' (its fields: {keys}; use --text-field)"
                    )
                if not isinstance(obj[text_field], str):
                    found = _json_type(obj[text_field])
                    raise UserError(f"{path}:{lineno}: field '{text_field}' is {found}, not a string")
                yield obj[text_field]
    except UnicodeDecodeError as e:
        raise UserError(f"data file '{path}' is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UserError(f"cannot read data file '{path}': {e.strerror or e}") from None
    except (EOFError, zlib.error) as e:  # a truncated (an interrupted download) or damaged .gz
        raise UserError(f"data file '{path}' is damaged or truncated ({type(e).__name__}: {e})") from None


def _json_type(value) -> str:
    """A parsed JSON value's type in JSON's words (for error messages)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"data source '{source}' not found (a built-in corpus {sorted(BUILTIN_CORPORA)}, a .txt/.jsonl "
            "file (.gz too), a folder of them, hf:NAME, hf-cache:NAME or hf-disk:PATH)"
        )
    if path.is_dir():
        files = [f for f in _visible_files(path) if _suffix(f) in TEXT_SUFFIXES]
        if not files:
            raise UserError(f"data folder '{source}' holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    return [path]


def iter_documents(source: str, text_field: str = "text", max_docs: int = 0):
    """Stream a text source: ``(split, chunks)`` per non-empty document, ``split`` None (to be split
    by :func:`stream_split`) or "train"/"val" (a dataset's own splits); ``chunks`` an iterator of
    its :data:`CHUNK_CHARS` chunks, to be consumed before the next document is drawn."""
    if source in BUILTIN_CORPORA:
        yield None, iter_file_chunks(builtin_corpus_path(source))
        return
    if source.startswith(("hf:", "hf-disk:", "hf-cache:")):
        yield from _iter_hf_documents(source, text_field, max_docs)
        return
    n = 0
    for path in _local_files(source):
        if _suffix(path) in JSONL_SUFFIXES:
            docs = (iter(chunk_document(d)) for d in _iter_jsonl(path, text_field) if d.strip())
        else:
            docs = iter([iter_file_chunks(path)])
        for chunks in docs:
            yield None, chunks
            n += 1
            if max_docs and n >= max_docs:
                return


#: The offline switches of the Hugging Face libraries: recent ``datasets`` (5.x) reads
#: ``datasets.config.HF_HUB_OFFLINE`` (its ``HF_DATASETS_OFFLINE`` is only a backward-compatible
#: copy), older releases (2.14: pyproject's floor) ``HF_DATASETS_OFFLINE``; huggingface_hub reads
#: ``huggingface_hub.constants.HF_HUB_OFFLINE``. All are module globals set once from the environment at
#: import, so setting the environment variables later changes nothing.
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_OFFLINE_PACKAGES = ("datasets", "huggingface_hub")


_offline_lock = threading.Lock()
_offline_state: dict = {"depth": 0, "saved": []}  # blocks open now, and the switches as they were


@contextlib.contextmanager
def hf_offline():
    """Hugging Face offline mode for the block (no request to the hub: a dataset comes from the local
    cache or fails at once), then every switch as it was, so that the process is not left offline.
    Every module of ``datasets`` and ``huggingface_hub`` loaded so far that holds one of
    :data:`_OFFLINE_FLAGS` as a boolean (the libraries' own and any copy taken by import) is set.
    Blocks may overlap (threads, nesting): the first one in sets the switches, the last one out puts
    them back (an earlier exit left a later block online, and its exit then restored "offline")."""
    import datasets  # noqa: F401  (loads datasets.config and huggingface_hub.constants)

    with _offline_lock:
        if _offline_state["depth"] == 0:
            saved = []
            for name, module in list(sys.modules.items()):
                if module is None or name.partition(".")[0] not in _OFFLINE_PACKAGES:
                    continue
                own = getattr(module, "__dict__", {})  # (not getattr: a lazy module's __getattr__ imports)
                saved += [(module, f, own[f]) for f in _OFFLINE_FLAGS if isinstance(own.get(f), bool)]
            for module, flag, _ in saved:
                setattr(module, flag, True)
            _offline_state["saved"] = saved
        _offline_state["depth"] += 1
    try:
        yield
    finally:
        with _offline_lock:
            _offline_state["depth"] -= 1
            if _offline_state["depth"] == 0:
                for module, flag, value in _offline_state["saved"]:
                    setattr(module, flag, value)
                _offline_state["saved"] = []


def _not_cached(e: BaseException) -> bool:
    """Whether a load_dataset error under :func:`hf_offline` means "not in the local cache" (the
    hub was not asked, or the dataset / its config has no cached copy)."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(
        names & {"ConnectionError", "OfflineModeIsEnabled", "FileNotFoundError", "DatasetNotFoundError"}
    ) or ("Couldn't find cache" in str(e))


def _iter_hf_documents(source: str, text_field: str, max_docs: int):
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"data source '{source}' needs the Hugging Face datasets library: pip install htmuon[datasets]"
        ) from None
    kind, _, rest = source.partition(":")
    try:
        if kind == "hf-disk":
            if not Path(rest).exists():
                raise UserError(f"dataset folder '{rest}' not found")
            try:
                ds = datasets.load_from_disk(rest)
            except FileNotFoundError:  # a folder of data files: read locally, never the hub
                with hf_offline():
                    ds = datasets.load_dataset(rest)
        elif kind == "hf-cache":
            # the datasets cache only (memory-mapped Arrow files): strictly offline, nothing downloaded
            name, _, cfg = rest.partition(":")
            try:
                with hf_offline():
                    ds = datasets.load_dataset(name, cfg or None)
            except Exception as e:
                if not _not_cached(e):
                    raise
                cache = datasets.config.HF_DATASETS_CACHE
                fill = f"'{name}'" + (f", '{cfg}'" if cfg else "")
                why = " ".join(str(e).split())  # (a ConnectionError: the refused hub; nothing more)
                why = "" if isinstance(e, ConnectionError) else f" ({type(e).__name__}: {why[:200]})"
                raise UserError(
                    f"dataset '{rest}' is not in the local Hugging Face datasets cache ({cache}): "
                    f"hf-cache: reads only that cache, never the network; fill it once on a machine "
                    f'with a network (python -c "import datasets; datasets.load_dataset({fill})", '
                    f"HF_DATASETS_CACHE to choose the folder) or stream it with hf:{rest}{why}"
                ) from None
        else:  # hf: streamed from the hub
            name, _, cfg = rest.partition(":")
            ds = datasets.load_dataset(name, cfg or None, streaming=True)
    except UserError:
        raise
    except Exception as e:  # network / unknown dataset: a user-facing one-liner
        raise UserError(
            f"cannot load dataset '{rest}': {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    splits = (
        dict(ds)
        if isinstance(ds, (dict, datasets.DatasetDict, datasets.IterableDatasetDict))
        else {"train": ds}
    )
    chosen: list[tuple[str, str]] = []
    for want, names in (("train", ("train",)), ("val", ("validation", "valid", "val", "test"))):
        found = next((n for n in names if n in splits), None)
        if found:
            chosen.append((want, found))
    if not chosen or chosen[0][0] != "train":
        raise UserError(f"dataset '{source}' has no train split (splits: {sorted(splits)})")
    own_val = len(chosen) == 2
    for want, split in chosen:
        n = 0
        for i, row in enumerate(splits[split]):
            if text_field not in row:
                raise UserError(f"dataset '{source}' has no field '{text_field}' (use --text-field)")
            doc = row[text_field]
            if doc is not None and not isinstance(doc, str):  # (None: a missing value, skipped)
                raise UserError(
                    f"dataset '{source}': field '{text_field}' of row {i} of split '{split}' is a "
                    f"{type(doc).__name__}, not text (use --text-field)"
                )
            if not doc or not doc.strip():
                continue
            yield (want if own_val else None), iter(chunk_document(doc))
            n += 1
            if max_docs and n >= max_docs:
                break


def stream_split(docs, val_fraction: float, n_chunks_below_k: int | None):
    """``(split, chunks)`` with each chunk's split decided: every k-th chunk of the corpus, k =
    round(1/val_fraction) (:func:`_holdout_period`), to validation; with fewer than k chunks in all,
    the last one. ``n_chunks_below_k``: the corpus's chunk count when below k, else
    None. Yields ``(split, chunk)`` and ``(split, None)`` at the end of a document's part in a split."""
    k = _holdout_period(val_fraction)
    i = 0
    for given, chunks in docs:
        seen = set()
        for chunk in chunks:
            if given is not None:
                split = given
            else:
                last = n_chunks_below_k is not None and i == n_chunks_below_k - 1
                split = "val" if (i % k == k - 1 or last) else "train"
                i += 1
            seen.add(split)
            yield split, chunk
        for split in sorted(seen):
            yield split, None


def count_chunks_below(source: str, text_field: str, max_docs: int, k: int) -> int | None:
    """The number of chunks of a source without its own splits if it is below ``k``, else None
    (reads at most k chunks)."""
    n = 0
    for given, chunks in iter_documents(source, text_field, max_docs):
        if given is not None:
            return None
        for _ in chunks:
            n += 1
            if n >= k:
                return None
    return n


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder (``AutoTokenizer``, no download): T5's for the
    paper's C4 runs, GPT-2's for OpenWebText, or any other. Documents end with its EOS token."""

    def __init__(self, path: str):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UserError(f"tokenizer folder '{path}' not found (a local Hugging Face tokenizer folder)")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError("--tokenizer needs the transformers library: pip install htmuon[train]") from None
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            if not any(folder.iterdir()):
                raise UserError(
                    f"tokenizer folder '{path}' is empty (a local Hugging Face tokenizer folder)"
                ) from None
            text = " ".join(str(e).split())  # one line, whole (its first line can end mid-sentence)
            text = text if len(text) <= 300 else text[:297] + "..."
            raise UserError(f"cannot load the tokenizer in '{path}': {type(e).__name__}: {text}") from None
        tok.model_max_length = 1 << 62  # documents are tokenised whole; windows are cut later
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is None:
            raise UserError(f"the tokenizer in '{path}' has no EOS or SEP token to end documents with")
        self.tok, self.eos_id, self.vocab_size, self.folder = tok, int(eos), len(tok), folder

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def identity(self) -> str:
        """A hash of the folder's files (the cache key's tokenizer part)."""
        h = hashlib.sha256()
        for f in sorted(self.folder.rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(self.folder)).encode() + b"\x00" + f.read_bytes())
        return h.hexdigest()


class _BPE:
    """The local byte-level BPE (htmuon.train.tokenizer) behind HFTokenizer's small interface."""

    def __init__(self, tok):
        from htmuon.train.tokenizer import EOS

        self.tok, self.eos_id, self.vocab_size = tok, tok.token_to_id(EOS), tok.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]


def _source_identity(source: str, text_field: str, max_docs: int) -> str:
    """What a source's token cache depends on, without reading it: its files' paths, sizes and
    modification times (a built-in corpus: its file; a datasets source: its name or folder)."""
    parts = [source, text_field, str(max_docs)]
    if source in BUILTIN_CORPORA:
        files = [builtin_corpus_path(source)]
    elif source.startswith("hf-disk:"):
        root = Path(source[len("hf-disk:") :])
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.exists() else []
    elif source.startswith(("hf:", "hf-cache:")):
        files = []
    else:
        files = _local_files(source)
    for f in files:
        st = f.stat()
        parts.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return "\n".join(parts)


@dataclass
class TokenStreams:
    train: np.ndarray  # np.memmap of the train split's tokens
    val: np.ndarray
    vocab_size: int
    eos_id: int
    cache: Path
    digest: str  # tokens_digest(train, val), checked against meta.json's when the cache was opened


#: Building a token cache prints a progress line to stderr every this many seconds; a build that
#: finishes sooner (the built-in corpus on most machines, the tests) prints nothing.
BUILD_PROGRESS_S = 10.0


class _BuildProgress:
    """Progress of a token cache build (reading and tokenising a large corpus can take hours)."""

    def __init__(self, source: str):
        self.source, self.t0, self.shown = source, time.monotonic(), False
        self.last = self.t0

    def __call__(self, phase: str, chars: int, tokens: int | None = None, final: bool = False) -> None:
        now = time.monotonic()
        if (final and not self.shown) or (not final and now - self.last < BUILD_PROGRESS_S):
            return
        self.last, self.shown = now, True
        more = f", {tokens:,} tokens" if tokens is not None else ""
        print(
            f"token cache for '{self.source}': {phase}: {chars / 1e6:,.1f} M characters{more} "
            f"({now - self.t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def _open_streams(d: Path) -> TokenStreams:
    """Open a finished token cache, checking it first: a damaged ``meta.json``, a ``.bin`` file whose
    size is not the recorded token count, tokens whose :func:`tokens_digest` is not the one recorded
    when the cache was built (a changed byte; above :data:`DIGEST_FULL_BYTES` the digest samples
    slices), or a largest token id outside the vocabulary is a one-line error naming the file (never a
    silent misread). Caches built before the digest was recorded are checked by size only."""
    from htmuon.train.tokenizer import _corrupt

    meta_path = d / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        counts = {name: int(meta[f"{name}_tokens"]) for name in ("train", "val")}
        vocab, eos = int(meta["vocab_size"]), int(meta["eos_id"])
        max_id = int(meta.get("max_id", eos))
        if not 0 <= max(eos, max_id) < vocab:
            raise ValueError(f"token ids up to {max(eos, max_id)} beyond the vocabulary of {vocab}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _corrupt(meta_path, e) from None

    def view(name: str) -> np.ndarray:
        n, path = counts[name], d / f"{name}.bin"
        size = path.stat().st_size if path.is_file() else -1
        if size != n * dtype.itemsize:
            found = "missing" if size < 0 else f"{size} bytes"
            raise _corrupt(path, f"{found}, expected {n} {dtype.name} tokens = {n * dtype.itemsize} bytes")
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(n,))

    train, val = view("train"), view("val")
    digest = tokens_digest(train, val)
    if meta.get("tokens_digest", digest) != digest:
        # name the file that changed, from each file's own digest (older caches lack them, and both
        # files may have changed: then both are named)
        changed = [
            (name, found)
            for name, a in (("train", train), ("val", val))
            if f"{name}_digest" in meta and (found := tokens_digest(a)) != meta[f"{name}_digest"]
        ]
        if len(changed) == 1:
            ((name, found),) = changed
            path, what, recorded = d / f"{name}.bin", f"{name}.bin", meta[f"{name}_digest"]
        else:
            path, what = d / "train.bin", "train.bin / val.bin"
            found, recorded = digest, meta["tokens_digest"]
        raise _corrupt(
            path,
            f"the tokens in {what} are not those written (their digest is {found[:12]}..., meta.json "
            f"records {str(recorded)[:12]}...)",
        )
    return TokenStreams(train, val, vocab, eos, d, digest)


def build_token_streams(
    source: str,
    *,
    vocab_size: int,
    val_fraction: float,
    tokenizer: str = "",
    text_field: str = "text",
    max_docs: int = 0,
) -> TokenStreams:
    """Tokenise a text source into the on-disk token cache (once), streaming; returns memmaps.

    Args:
        source: a text source (``TrainConfig.data``).
        vocab_size: the local BPE's vocabulary (ignored with ``tokenizer``).
        val_fraction: held-out share (:func:`stream_split`).
        tokenizer: a local Hugging Face tokenizer folder, or "" for the local byte-level BPE trained
            on (at most :data:`BPE_TRAIN_MAX_CHARS` of) the train split.
        text_field, max_docs: as for :func:`iter_documents`.

    Returns:
        :class:`TokenStreams` over ``$HTMUON_CACHE/streams/KEY/{train,val}.bin``. The folder is
        written under a temporary name and renamed when complete, so a killed run leaves no partial
        cache and concurrent runs are safe.
    """
    from htmuon.train.tokenizer import TOKENIZER_VERSION, _corrupt, cache_dir, train_tokenizer

    hf = HFTokenizer(tokenizer) if tokenizer else None
    k = _holdout_period(val_fraction)
    h = hashlib.sha256()
    for part in (TOKEN_STREAM_VERSION, _source_identity(source, text_field, max_docs), str(val_fraction)):
        h.update(part.encode() + b"\x00")
    h.update((f"hf:{hf.identity()}" if hf else f"{TOKENIZER_VERSION}:{vocab_size}").encode())
    final = cache_dir() / "streams" / h.hexdigest()[:20]
    if (final / "meta.json").exists():
        return _open_streams(final)
    if final.exists():  # (it appears complete, by a rename): damaged since
        raise _corrupt(final / "meta.json", "missing")
    remove_killed_builds(final.parent)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    build_lock = tmp / BUILD_LOCK
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        acquire_lock(build_lock)  # (a leftover of a killed build: removed by the next build on this host)
        below = count_chunks_below(source, text_field, max_docs, k)

        def split_chunks():
            return stream_split(iter_documents(source, text_field, max_docs), val_fraction, below)

        progress = _BuildProgress(source)
        if hf is None:

            def train_text():
                budget = BPE_TRAIN_MAX_CHARS
                for split, chunk in split_chunks():
                    if split == "train" and chunk is not None:
                        yield chunk
                        budget -= len(chunk)
                        progress("training the tokenizer", BPE_TRAIN_MAX_CHARS - budget)
                        if budget <= 0:
                            return

            bpe = train_tokenizer([train_text()], vocab_size)
            (tmp / "tokenizer.json").write_text(bpe.to_str(), encoding="utf-8")
            enc = _BPE(bpe)
        else:
            enc = hf
        dtype = np.dtype(np.uint16 if enc.vocab_size <= 65535 else np.uint32)
        counts = {"train": 0, "val": 0}
        chars = 0
        max_id = enc.eos_id
        files = {s: open(tmp / f"{s}.bin", "wb") for s in counts}
        try:
            pending: dict[str, list] = {"train": [], "val": []}  # chunk texts, None = end of document

            def flush(split: str) -> None:
                nonlocal max_id, chars
                items = pending[split]
                texts = [t for t in items if t is not None]
                chars += sum(map(len, texts))
                ids = iter(enc.encode_batch(texts)) if texts else iter(())
                out = []
                for t in items:
                    out.append(
                        np.asarray(next(ids), dtype=dtype)
                        if t is not None
                        else np.asarray([enc.eos_id], dtype)
                    )
                if out:
                    arr = np.concatenate(out)
                    files[split].write(arr.tobytes())
                    counts[split] += len(arr)
                    max_id = max(max_id, int(arr.max()))
                items.clear()
                progress("tokenising", chars, counts["train"] + counts["val"])

            for split, chunk in split_chunks():
                pending[split].append(chunk)
                if len(pending[split]) >= ENCODE_BATCH_CHUNKS:
                    flush(split)
            for split in pending:
                flush(split)
            progress("tokenised", chars, counts["train"] + counts["val"], final=True)
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in files.values():
                f.close()
        if counts["train"] == 0 or counts["val"] == 0:
            raise UserError(
                f"data source '{source}' is empty or too small to split into train and validation"
            )
        meta = {
            "format": TOKEN_STREAM_VERSION,
            "source": source,
            "tokenizer": str(hf.folder) if hf else f"local BPE, vocab {vocab_size}",
            "vocab_size": enc.vocab_size,
            "eos_id": enc.eos_id,
            "dtype": dtype.name,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "max_id": max_id,
        }
        streams = {s: np.memmap(tmp / f"{s}.bin", dtype=dtype, mode="r", shape=(counts[s],)) for s in counts}
        meta["tokens_digest"] = tokens_digest(*streams.values())
        # each file's own, so that a damaged cache names the file that changed
        meta.update({f"{s}_digest": tokens_digest(a) for s, a in streams.items()})
        del streams
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        release_lock(build_lock)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():  # not another run finishing first
                raise
    except OSError as e:
        raise UserError(
            f"cannot write the token cache under '{final.parent}': {e.strerror or e} (set HTMUON_CACHE)"
        ) from None
    finally:
        release_lock(build_lock)  # (nothing if it was released above, or never taken)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _open_streams(final)


#: The lock a token-cache build holds in its temporary folder (``.KEY.tmpPID/build.lock``).
BUILD_LOCK = "build.lock"


def remove_killed_builds(folder: Path) -> list[Path]:
    """Remove the temporary folders that token-cache builds killed on this host left in ``folder`` (a
    build of a large corpus leaves gigabytes): those whose :data:`BUILD_LOCK` is stale
    (:func:`htmuon.train.locks.lock_is_stale`: its process is dead) and whose ``flock`` no live process
    holds. A build on another host sharing the cache, one whose flock is held (a live build in another
    PID namespace under this host name: containers with the host's network share its name, so its PID
    is not alive here), or a folder without the lock (being made right now, or by an older htmuon), is
    left alone. Returns the folders removed, each named on stderr."""
    removed = []
    for d in sorted(folder.glob(".*.tmp*")) if folder.is_dir() else []:
        lock = d / BUILD_LOCK
        if d.is_dir() and lock.exists() and lock_is_stale(lock) and _unheld(lock):
            shutil.rmtree(d, ignore_errors=True)
            print(f"htmuon: removed '{d}', left by a token-cache build that was killed", file=sys.stderr)
            removed.append(d)
    return removed


def load_token_data(cfg) -> tuple[TokenData, int, dict]:
    """The LM data of a resolved ``TrainConfig``: (TokenData over the memmapped cache, vocabulary
    size for the model, info for run.json)."""
    streams = build_token_streams(
        cfg.data,
        vocab_size=cfg.vocab_size,
        val_fraction=cfg.val_fraction,
        tokenizer=cfg.tokenizer,
        text_field=cfg.text_field,
        max_docs=cfg.max_docs,
    )
    data = TokenData(streams.train, streams.val, cfg.seq_len, cfg.batch_size, cfg.seed)
    info = {
        "train_tokens": int(len(streams.train)),
        "val_tokens": int(len(streams.val)),
        "tokens_digest": streams.digest,
        "token_cache": str(streams.cache),
        "tokenizer": cfg.tokenizer or "local BPE",
    }
    return data, streams.vocab_size, info


#: Token streams up to this many bytes are hashed whole by :func:`tokens_digest`; larger ones by slices.
DIGEST_FULL_BYTES = 256 * 2**20
DIGEST_SLICES, DIGEST_SLICE_BYTES = 4096, 64 * 2**10


def tokens_digest(*streams: np.ndarray) -> str:
    """A SHA-256 of the token streams' content (what a resumed run checks it continues on): whole streams
    up to :data:`DIGEST_FULL_BYTES`, else :data:`DIGEST_SLICES` evenly spaced slices of each, with the
    lengths (a re-tokenised or edited corpus shifts or changes tokens everywhere after the edit)."""
    h = hashlib.sha256()
    for a in streams:
        raw = np.asarray(a).view(np.uint8).reshape(-1)
        h.update(f"{a.dtype}:{len(a)}\x00".encode())
        if raw.size <= DIGEST_FULL_BYTES:
            h.update(memoryview(np.ascontiguousarray(raw)))
            continue
        step = raw.size // DIGEST_SLICES
        for start in range(0, raw.size - DIGEST_SLICE_BYTES + 1, step):
            h.update(memoryview(np.ascontiguousarray(raw[start : start + DIGEST_SLICE_BYTES])))
    return h.hexdigest()


# ----------------------------------------------------------------------------- ImageNet (ImageFolder)

#: ImageNet's channel statistics (RGB, [0, 1] scale), the usual normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Training / evaluation resolution for ``imagenet:DIR`` (``imagenet:DIR@SIZE`` changes it).
IMAGENET_SIZE = 224
#: Evaluation: resize the shorter side to SIZE / this, then centre-crop SIZE (224 <- 256).
EVAL_CROP_FRACTION = 0.875
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_imagenet_source(source: str) -> tuple[Path, int]:
    """``imagenet:DIR[@SIZE]`` -> (DIR, SIZE); DIR holds ``train/CLASS/*`` and ``val/CLASS/*``."""
    _, _, rest = source.partition(":")
    path, size = rest, IMAGENET_SIZE
    head, sep, tail = rest.rpartition("@")
    if sep and tail.isdigit():
        path, size = head, int(tail)
    if not path:
        raise UserError("image dataset 'imagenet' needs a local folder: --data imagenet:DIR[@SIZE]")
    if size < 1:
        raise UserError(f"imagenet image size must be >= 1, got {size}")
    root = Path(path).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(
                f"imagenet folder '{root}' lacks '{split}/' (an ImageFolder tree: {split}/CLASS/IMAGE)"
            )
    return root, size


def _image_files(folder: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, [(image, class index)]) of ``folder/CLASS/...``: as torchvision's ImageFolder, a class
    folder is read recursively and symlinks are followed; hidden folders and files (a name starting
    with '.': ``.ipynb_checkpoints/``, macOS's ``._NAME``) are skipped, not taken for a class or an
    image. A train class without images is an error (its label could never be learned)."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"'{folder}' has classes not in train/: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    per_class = {
        c: [f for f in _visible_files(folder / c) if f.suffix.lower() in IMAGE_SUFFIXES] for c in found
    }
    items = [(f, index[c]) for c in found for f in per_class[c]]
    empty = [c for c in found if not per_class[c]]
    if items and empty and classes is found:
        raise UserError(
            f"class folder '{folder / empty[0]}' holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            f"{len(empty)} class folder(s) of '{folder}' are empty"
        )
    if not items:
        raise UserError(
            f"image folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)} in CLASS/ folders)"
        )
    return classes, items


class ImageFolderData:
    """An ImageNet-style folder tree, decoded batch by batch (never all in memory).

    Training images: a random resized crop (area 8-100 %, aspect 3/4-4/3) to SIZE x SIZE and a
    random horizontal flip, drawn from ``(seed, epoch, position)`` so a resumed run sees the same
    pixels; validation: the shorter side resized to SIZE / 0.875 and a centre crop. Both normalised
    with ImageNet's mean and std. Decoding runs on a thread pool (PIL releases the GIL).
    """

    def __init__(self, root: Path, image_size: int, batch_size: int, seed: int, workers: int = 0):
        try:
            from PIL import Image
        except ImportError:
            raise UserError("imagenet:DIR needs Pillow: pip install htmuon[images]") from None
        self._Image = Image
        self.classes, self.train_items = _image_files(root / "train", None)
        _, self.val_items = _image_files(root / "val", self.classes)
        self.num_classes, self.in_channels = len(self.classes), 3
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.sampler = BlockSampler(len(self.train_items), batch_size, seed)
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
        self._std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]

    @property
    def n_train(self) -> int:
        return len(self.train_items)

    @property
    def n_val(self) -> int:
        return len(self.val_items)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size

    def _open(self, path: Path):
        try:
            with self._Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:
            raise UserError(f"cannot decode image '{path}': {type(e).__name__}: {e}") from None

    def _train_image(self, path: Path, rng: np.random.Generator) -> np.ndarray:
        im = self._open(path)
        w, h = im.size
        box = (0, 0, w, h)
        for _ in range(10):  # random resized crop, as torchvision's (fallback: the whole image)
            area = w * h * rng.uniform(0.08, 1.0)
            aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                box = (x0, y0, x0 + cw, y0 + ch)
                break
        flip = rng.random() < 0.5
        im = im.resize((self.image_size, self.image_size), self._Image.BILINEAR, box=box)
        if flip:
            im = im.transpose(self._Image.FLIP_LEFT_RIGHT)
        return self._to_array(im)

    def _val_image(self, path: Path) -> np.ndarray:
        im = self._open(path)
        w, h = im.size
        short = max(self.image_size, round(self.image_size / EVAL_CROP_FRACTION))
        scale = short / min(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), self._Image.BILINEAR)
        w, h = im.size
        x0, y0 = (w - self.image_size) // 2, (h - self.image_size) // 2
        return self._to_array(im.crop((x0, y0, x0 + self.image_size, y0 + self.image_size)))

    def _to_array(self, im) -> np.ndarray:
        x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self._mean) / self._std

    def _decode(self, fn, args) -> torch.Tensor:
        from concurrent.futures import ThreadPoolExecutor

        if self.workers > 1 and len(args) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                arrays = list(pool.map(lambda a: fn(*a), args))
        else:
            arrays = [fn(*a) for a in args]
        return torch.from_numpy(np.stack(arrays))

    def next_batch(self):
        epoch, position = self.sampler.epoch, self.sampler.index
        idx = self.sampler.next_indices()
        rngs = [np.random.default_rng([self.seed, epoch, position + i]) for i in range(len(idx))]
        x = self._decode(self._train_image, [(self.train_items[j][0], r) for j, r in zip(idx, rngs)])
        y = torch.as_tensor([self.train_items[j][1] for j in idx], dtype=torch.long)
        return x, y

    def val_batches(self, max_batches: int = 0, window: int = 0):
        """Held-out batches: all, or ``max_batches`` from window number ``window`` (wrapping around)."""
        items = self.val_items
        if max_batches:
            k = min(len(items), max_batches * self.batch_size)
            start = (window * k) % len(items) if items else 0
            items = (items[start:] + items[:start])[:k]
        for i in range(0, len(items), self.batch_size):
            batch = items[i : i + self.batch_size]
            x = self._decode(self._val_image, [(f,) for f, _ in batch])
            yield x, torch.as_tensor([c for _, c in batch], dtype=torch.long)
