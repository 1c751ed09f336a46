"""Shared test utilities: matrices with a chosen spectrum, and an independent reference step."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from htmuon.torchrun import fsdp_refusal


@contextlib.contextmanager
def flock_held_elsewhere(lock: Path, text: str):
    """While the block runs, another process holds an ``flock`` on ``lock`` (created holding ``text``):
    a lock's live taker as seen from another PID namespace when ``text`` names a PID not alive here."""
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(lock)!r}, os.O_CREAT | os.O_WRONLY, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"os.write(fd, {(text + chr(10)).encode()!r})\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.communicate()  # (its stdin closed: it exits, and the kernel drops its flock)


def load_script(name: str):
    """``scripts/<name>.py`` of the repository, imported as a module (registered in ``sys.modules``,
    where dataclasses look their module up)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: torch's release as (major, minor): the package supports torch >= 2.4 (pyproject), CI runs 2.13.
TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])

#: torch.optim.Muon, the reference of the tests that compare against it, is new in torch 2.9.
needs_torch_muon = pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"),
    reason=f"torch.optim.Muon is new in torch 2.9 (torch {torch.__version__})",
)

#: The compiled step as one graph: torch 2.4's dynamo breaks the graph in it (``dict.setdefault``
#: with a tuple key, ``bytes.decode``); eager steps are what torch 2.4 runs (docs/backends.md).
needs_fullgraph_step = pytest.mark.skipif(
    TORCH_VERSION < (2, 5), reason=f"torch {torch.__version__}'s dynamo cannot trace the step as one graph"
)


def _has_public_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


#: FSDP2 on CPUs (gloo), what the tests run: ``fully_shard`` is public from torch 2.6 (torch 2.4's private
#: one needs CUDA) and trains right on CPUs from 2.9 (htmuon.torchrun.FSDP_CPU_TORCH, which says what
#: 2.6-2.8 do); htmuon.torchrun refuses parallel="fsdp" where it cannot.
HAS_FSDP2 = fsdp_refusal(torch.__version__, "cpu", _has_public_fsdp2()) is None
needs_fsdp2 = pytest.mark.skipif(
    not HAS_FSDP2,
    reason=f"FSDP2 (fully_shard) trains right on CPUs from torch 2.9 (torch {torch.__version__})",
)


def baseline_library_error(optimizer: str) -> str | None:
    """Why the library of a baseline in ``htmuon.train.optimizers.OPTIMIZERS`` cannot be used here (not
    installed, or a release that fails to import with this torch: heavyball 3.2 on torch 2.4), else None."""
    from htmuon.errors import UserError
    from htmuon.train.optimizers import OPTIMIZERS, _require

    library = OPTIMIZERS[optimizer].get("library")
    try:
        if library:
            _require(library, optimizer)  # the library's own check, and its message
    except UserError as e:
        return str(e)
    return None


def skip_without_library(optimizer: str) -> None:
    """Skip the test where the baseline's library cannot be used (:func:`baseline_library_error`)."""
    why = baseline_library_error(optimizer)
    if why:
        pytest.skip(why)


def dcp_save(state_dict, path) -> None:
    """``torch.distributed.checkpoint.save`` into the folder ``path`` without a process group (torch
    2.4's ``save`` has no ``no_dist``: its older ``save_state_dict`` does)."""
    import inspect

    import torch.distributed.checkpoint as dcp

    if "no_dist" in inspect.signature(dcp.save).parameters:
        dcp.save(state_dict, checkpoint_id=path, no_dist=True)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dcp.save_state_dict(state_dict, storage_writer=dcp.FileSystemWriter(path), no_dist=True)


def dtensor_api():
    """``(Shard, Replicate, distribute_tensor, init_device_mesh)``: public in torch.distributed.tensor
    from torch 2.5, in torch.distributed._tensor on torch 2.4."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import Replicate, Shard, distribute_tensor
    return Shard, Replicate, distribute_tensor, init_device_mesh


def matrix_with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``U diag(s) V^T`` with Haar-random orthonormal U (m x k) and V (n x k), k = len(s)."""
    g = torch.Generator().manual_seed(seed)
    k = s.numel()
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((U * s.double()) @ V.T).to(dtype)


def log_spectrum(k: int, lo: float = 1e-3, hi: float = 1.0) -> torch.Tensor:
    return torch.logspace(math.log10(hi), math.log10(lo), k, dtype=torch.float64)


def exact_power(G: torch.Tensor, p: float) -> torch.Tensor:
    """``U diag(s**p) V^T`` in float64, written independently of the library."""
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    w = torch.where(s > s.max() * max(G.shape[-2:]) * 2.2e-16, s.pow(p), torch.zeros_like(s))
    return (U * w.unsqueeze(-2)) @ Vh


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def reference_htmuon(W0, grads, *, lr, p, momentum=0.95, nesterov=True, weight_decay=0.0):
    """The update rule of the paper (arXiv 2603.10067) in float64, step by step (no library code)."""
    W = W0.double().clone()
    M = torch.zeros_like(W)
    m, n = W.shape
    for G in grads:
        G = G.double()
        M = momentum * M + (1 - momentum) * G
        N = (1 - momentum) * G + momentum * M if nesterov else M
        O = exact_power(N, p) * math.sqrt(max(1.0, m / n))
        W = W * (1 - lr * weight_decay) - lr * O
    return W


#: The smallest useful training run (LLaMA-micro, 6 steps, one thread, quiet): the base of the
#: harness tests' configs, which override what they exercise.
TINY_RUN = dict(
    model="llama-micro",
    vocab_size=320,
    seq_len=16,
    batch_size=2,
    steps=6,
    warmup_steps=2,
    eval_every=3,
    eval_batches=2,
    log_every=1,
    ckpt_every=3,
    threads=1,
    progress="none",
    alpha=False,
)


def flags(config: dict) -> list[str]:
    """Config keys as ``htmuon train`` / ``compare`` command-line flags."""
    out = []
    for key, value in config.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):  # a switch: --key / --no-key
            out.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            out += [f"--{flag}", str(value)]
    return out


def tiny_llama(seed: int = 0, *, tied: bool = False, vocab: int = 64):
    """A Hugging Face LLaMA of ~10k parameters (hidden 16, 2 layers), built from its config (skips the
    test when transformers is missing)."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(cfg)
