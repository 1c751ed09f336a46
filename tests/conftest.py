import gzip
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, so that CI is reproducible on every machine;
# HYPOTHESIS_PROFILE=explore draws new ones each run (how the float64 top-of-range case of
# tests/test_finite.py was found).
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

sys.path.insert(0, os.path.dirname(__file__))
# The "auto" backend and working dtype depend on the CPU (htmuon.spectral.decide: fast + bfloat16 on
# AMX / AVX-512-BF16 CPUs, exact eigh + float32 on AVX2 ones). Pin the AVX2 choice so that every
# machine runs the same numerics (worker processes inherit it); the tests of the per-hardware choice
# set HTMUON_CPU_BF16 themselves.
os.environ["HTMUON_CPU_BF16"] = "0"
# One thread: tests use small matrices, and CI machines are often shared (OpenMP oversubscription
# slows small kernels by orders of magnitude).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _htmuon_cache(tmp_path_factory, monkeypatch):
    """Tokenizers and token streams are cached in the session's temp folder, never in ~/.cache."""
    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path_factory.getbasetemp() / "htmuon-cache"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """The first ~150 kB of the built-in corpus: real English text, fast to tokenize."""
    from htmuon.train.data import builtin_corpus_path

    with gzip.open(builtin_corpus_path(), "rt", encoding="utf-8") as f:
        text = f.read(150_000)
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(text, encoding="utf-8")
    return path
