"""Throughput and peak memory of the streaming LM data path alone (no model), at growing corpus sizes.

    PYTHONPATH=src python benchmarks/data_stream.py                  # 5, 50, 200 MB
    PYTHONPATH=src python benchmarks/data_stream.py --sizes-mb 5 50

A byte-level BPE (vocabulary 32000) is trained once on the built-in corpus and saved as a Hugging Face
tokenizer folder; each size is then a fresh process that writes a JSONL corpus of that many MB (the
built-in corpus's paragraphs in a seeded random order, ~2 kB documents), calls
``htmuon.train.data.build_token_streams`` with ``tokenizer=FOLDER`` into an empty cache, and draws
200 batches of 64 x 256 tokens from the memmapped streams. It reports the tokenise-and-pack rate
(tokens/s), the sampling rate, and the process's peak resident memory (``ru_maxrss``) after packing
and after sampling - flat if nothing holds the corpus or its tokens in memory (sampling adds the
memmapped file pages it touches, which count as resident). One thread for the tokenizer
(``RAYON_NUM_THREADS=1``, ``TOKENIZERS_PARALLELISM=false``) unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_tokenizer(folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from htmuon.train.data import builtin_corpus_path
    from htmuon.train.tokenizer import EOS, train_tokenizer

    with gzip.open(builtin_corpus_path(), "rt", encoding="utf-8") as f:
        text = f.read()
    tok = train_tokenizer([[text[i : i + 8192] for i in range(0, len(text), 8192)]], 32000)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(folder))


def make_corpus(path: Path, mb: float, seed: int = 0) -> int:
    import random

    from htmuon.train.data import builtin_corpus_path

    with gzip.open(builtin_corpus_path(), "rt", encoding="utf-8") as f:
        paras = [p for p in f.read().split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target, written = int(mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            doc, n = [], 0
            while n < 2000:
                p = rng.choice(paras)
                doc.append(p)
                n += len(p)
            line = json.dumps({"text": "\n\n".join(doc)}) + "\n"
            out.write(line)
            written += len(line.encode())
    return written


def one_size(mb: float, tokenizer: str, work: Path) -> dict:
    from htmuon.train.data import TokenData, build_token_streams

    corpus = work / f"corpus_{mb:g}mb.jsonl"
    size = make_corpus(corpus, mb)
    os.environ["HTMUON_CACHE"] = str(work / f"cache_{mb:g}")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    streams = build_token_streams(str(corpus), vocab_size=0, val_fraction=0.005, tokenizer=tokenizer)
    t_build = time.perf_counter() - t0
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_tokens = len(streams.train) + len(streams.val)
    data = TokenData(streams.train, streams.val, 256, 64, seed=0)
    t0 = time.perf_counter()
    for _ in range(200):
        data.next_batch()
    t_sample = time.perf_counter() - t0
    return {
        "corpus_mb": size / 1e6,
        "tokens": n_tokens,
        "build_s": t_build,
        "tokens_per_s": n_tokens / t_build,
        "batches_per_s": 200 / t_sample,
        "peak_rss_mb_before": rss0 / 1024,
        "peak_rss_mb_build": rss_build / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cache_mb": sum(f.stat().st_size for f in streams.cache.iterdir()) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[5, 50, 200])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.tokenizer, Path(args.work))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe, header

    print(header(describe()))
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_tokenizer(work / "tok")
        print("| corpus (MB) | tokens | tokenise + pack (s) | tokens/s | batches/s (64x256) |", end="")
        print(" peak RSS after packing (MB) | peak RSS after sampling (MB) |")
        print("|---|---|---|---|---|---|---|")
        for mb in args.sizes_mb:
            cmd = [sys.executable, __file__, "--one", str(mb), "--tokenizer", str(work / "tok")]
            cmd += ["--work", tmp]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {r['corpus_mb']:.0f} | {r['tokens']:,} | {r['build_s']:.1f} | {r['tokens_per_s']:,.0f} "
                f"| {r['batches_per_s']:,.0f} | {r['peak_rss_mb_build']:.0f} | {r['peak_rss_mb']:.0f} |",
                flush=True,
            )
            for f in work.glob(f"corpus_{mb:g}mb.jsonl"):
                f.unlink()


if __name__ == "__main__":
    main()
