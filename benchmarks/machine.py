"""What machine a benchmark ran on: CPU model, matmul ISA, torch version, GPU (shared by the benchmarks).

The matmul ISA decides what a bfloat16 matrix product costs on a CPU, and so which Newton--Schulz
working dtype is fast there: ``amx_bf16`` (Intel AMX tiles, Sapphire Rapids and later) and
``avx512_bf16`` (AVX-512 BF16 dot products) run bfloat16 matmuls several times faster than
float32; on ``avx512`` / ``avx2`` machines without BF16 instructions they are 30-180x slower.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

#: Matmul ISA levels, best first: the first whose flags a CPU has names it (/proc/cpuinfo flag names).
ISA_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("amx_bf16", ("amx_bf16", "amx_tile")),
    ("avx512_bf16", ("avx512_bf16",)),
    ("avx512", ("avx512f",)),
    ("avx2", ("avx2", "fma")),
)


def require_torch_muon() -> None:
    """Stop with one line where ``torch.optim.Muon``, the reference every ratio is to, is missing."""
    if not hasattr(torch.optim, "Muon"):
        raise SystemExit(
            f"this benchmark measures against torch.optim.Muon, new in torch 2.9 (torch {torch.__version__})"
        )


def _first_processor(text: str) -> dict[str, str]:
    """The ``key: value`` fields of the first processor in a /proc/cpuinfo text: the lines before the
    second ``processor`` line, each key's first value."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor" and fields:
            break  # the next processor
        fields.setdefault(key, value.strip())
    return fields


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor listed in a /proc/cpuinfo text; ('', {}) if absent."""
    fields = _first_processor(text)
    return fields.get("model name", ""), frozenset(fields.get("flags", "").split())


def cpu_id(text: str) -> str:
    """``"family F model M"`` of the first processor in a /proc/cpuinfo text ('' if absent): the model
    name alone does not tell CPU generations apart (``AMD EPYC`` under KVM is Zen 4, family 25, or
    Zen 5, family 26, whose bfloat16 matmuls differ 2x against float32)."""
    fields = _first_processor(text)
    family, model = fields.get("cpu family", ""), fields.get("model", "")
    return f"family {family} model {model}" if family and model else ""


def matmul_isa(flags: frozenset[str] | set[str]) -> str:
    """The best matmul ISA level in ``flags`` (see :data:`ISA_LEVELS`), or ``"other"``."""
    for name, needed in ISA_LEVELS:
        if all(f in flags for f in needed):
            return name
    return "other"


def describe(device: str = "cpu", cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The machine as a dict: CPU model and ISA, core count, torch version and threads, GPU name."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    model, flags = parse_cpuinfo(text)
    info = {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_id": cpu_id(text),
        "isa": matmul_isa(flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    info.update(auto_choice(device))
    return info


def auto_choice(device: str = "cpu") -> dict:
    """What HTMuon's ``method="auto"`` / ``ns_dtype="auto"`` run on ``device`` (``{"auto": "fast,
    bfloat16"}``), and the ``HTMUON_CPU_BF16`` override where it is set: the ISA alone does not say
    which path a run measured (with ``HTMUON_CPU_BF16=0`` an AVX-512-BF16 CPU runs the AVX2 path).
    Empty where htmuon is not importable."""
    try:
        from htmuon.spectral import CPU_BF16_ENV, decide, device_capability
    except ImportError:
        return {}
    method, dtype = decide(device_capability(device))
    out = {"auto": f"{method}, {str(dtype).removeprefix('torch.')}"}
    if os.environ.get(CPU_BF16_ENV) is not None:
        out["override"] = f"{CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]}"
    return out


def header(info: dict) -> str:
    """One comment line naming the machine, for the top of every printed table."""
    load = info.get("loadavg")
    load_s = f", load average {load[0]:.1f}" if load else ""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    ident = f", {info['cpu_id']}" if info.get("cpu_id") else ""
    auto = f", HTMuon auto: {info['auto']}" if info.get("auto") else ""
    if info.get("override"):
        auto += f" ({info['override']})"
    return (
        f"# CPU {info['cpu']} ({info['cores']} cores{ident}), matmul ISA {info['isa']} "
        f"(torch capability {info['torch_cpu_capability']}){gpu}, torch {info['torch']}, "
        f"{info['threads']} thread(s){auto}{load_s}"
    )


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def round_order(keys: list, r: int) -> list:
    """``keys`` in round ``r``'s order: rotated by ``r``, so that none of them always runs first or always
    right after another (a cache warmed by the one before)."""
    return keys[r % len(keys) :] + keys[: r % len(keys)]


def time_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Wall seconds of one call of each function per round, in :func:`round_order`."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in round_order(list(fns), r):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times
