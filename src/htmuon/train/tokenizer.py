"""A byte-level BPE tokenizer trained locally on the train split, and cached token streams.

The tokenizer is trained with Hugging Face ``tokenizers`` (byte-level BPE, like GPT-2's, so
every UTF-8 text is encodable) on the train split only; the same corpus and vocabulary size
give the same vocabulary. Tokenizer and token streams are cached under ``$HTMUON_CACHE``
(default ``~/.cache/htmuon``), keyed by a SHA-256 of the corpus splits and the vocabulary
size, and written atomically (temp file + ``os.replace``), so concurrent runs are safe.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from htmuon.cli import UserError
from htmuon.train.data import TextSplits, atomic_write_bytes

EOS = "<|endoftext|>"
TOKENIZER_VERSION = "bytelevel-bpe-v1"


def cache_dir() -> Path:
    root = os.environ.get("HTMUON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "htmuon")
    return Path(root)


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError(
            "training a tokenizer needs the tokenizers library: pip install htmuon[train]"
        ) from None
    return tokenizers


def train_tokenizer(docs: list[list[str]], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``docs`` (lists of chunks); returns a ``tokenizers.Tokenizer``."""
    tk = _require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise UserError(f"vocab_size must be at least 300 (256 bytes + merges), got {vocab_size}")
    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((chunk for doc in docs for chunk in doc), trainer=trainer)
    return tok


def corpus_key(splits: TextSplits, vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(TOKENIZER_VERSION.encode())
    h.update(str(vocab_size).encode())
    h.update(b"\x00train\x00" + splits.train_text_for_hash.encode("utf-8"))
    h.update(b"\x00val\x00" + splits.val_text_for_hash.encode("utf-8"))
    return h.hexdigest()[:20]


def encode_docs(tok, docs: list[list[str]]) -> np.ndarray:
    """Encode documents into one stream; documents end with the EOS token."""
    eos = tok.token_to_id(EOS)
    out: list[np.ndarray] = []
    for doc in docs:
        for enc in tok.encode_batch(doc):
            out.append(np.asarray(enc.ids, dtype=np.int32))
        out.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _corrupt(path: Path, why: str | Exception) -> UserError:
    if isinstance(why, Exception):
        text = str(why).strip()
        why = f"{type(why).__name__}: {text.splitlines()[0][:120]}" if text else type(why).__name__
    return UserError(
        f"token cache file '{path}' is unusable ({why}); delete its folder '{path.parent}' to rebuild it"
    )


def _load_tokenizer(tk, path: Path):
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise _corrupt(path, e) from None


def _load_ids(path: Path, vocab_size: int) -> np.ndarray:
    """A cached token stream: a 1-D int32 .npy array of ids below ``vocab_size``."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise _corrupt(path, e) from None
    if ids.ndim != 1 or ids.dtype != np.int32:
        raise _corrupt(path, f"expected a 1-D int32 array, got {ids.ndim}-D {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise _corrupt(path, f"token ids outside [0, {vocab_size})")
    return ids


def prepare_tokens(splits: TextSplits, vocab_size: int):
    """Return (tokenizer, train_ids, val_ids, cache_path), training/encoding only on a cache miss."""
    tk = _require_tokenizers()
    key = corpus_key(splits, vocab_size)
    d = cache_dir() / "tokens" / key
    tok_path, tr_path, va_path = d / "tokenizer.json", d / "train.npy", d / "val.npy"
    if tok_path.exists() and tr_path.exists() and va_path.exists():
        tok = _load_tokenizer(tk, tok_path)
        vocab = tok.get_vocab_size()
        return tok, _load_ids(tr_path, vocab), _load_ids(va_path, vocab), d
    tok = train_tokenizer(splits.train, vocab_size)
    tr = encode_docs(tok, splits.train)
    va = encode_docs(tok, splits.val)
    try:
        atomic_write_bytes(tok_path, tok.to_str().encode("utf-8"))
        atomic_write_bytes(tr_path, _npy_bytes(tr))
        atomic_write_bytes(va_path, _npy_bytes(va))
    except OSError as e:
        raise UserError(
            f"cannot write the token cache under '{d}': {e.strerror} (set HTMUON_CACHE)"
        ) from None
    return tok, tr, va, d
