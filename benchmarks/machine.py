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
from pathlib import Path

import torch

#: Matmul ISA levels, best first: the first whose flags a CPU has names it (/proc/cpuinfo flag names).
ISA_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("amx_bf16", ("amx_bf16", "amx_tile")),
    ("avx512_bf16", ("avx512_bf16",)),
    ("avx512", ("avx512f",)),
    ("avx2", ("avx2", "fma")),
)


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor listed in a /proc/cpuinfo text; ('', {}) if absent."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags


def matmul_isa(flags: frozenset[str] | set[str]) -> str:
    """The best matmul ISA level in ``flags`` (see :data:`ISA_LEVELS`), or ``"other"``."""
    for name, needed in ISA_LEVELS:
        if all(f in flags for f in needed):
            return name
    return "other"


def describe(device: str = "cpu", cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The machine as a dict: CPU model and ISA, core count, torch version and threads, GPU name."""
    try:
        model, flags = parse_cpuinfo(Path(cpuinfo).read_text())
    except OSError:
        model, flags = "", frozenset()
    info = {
        "cpu": model or platform.processor() or platform.machine(),
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
    return info


def header(info: dict) -> str:
    """One comment line naming the machine, for the top of every printed table."""
    load = info.get("loadavg")
    load_s = f", load average {load[0]:.1f}" if load else ""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"# CPU {info['cpu']} ({info['cores']} cores), matmul ISA {info['isa']} "
        f"(torch capability {info['torch_cpu_capability']}){gpu}, torch {info['torch']}, "
        f"{info['threads']} thread(s){load_s}"
    )


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
