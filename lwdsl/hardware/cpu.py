"""Which CPU this is: its model, the instruction-set flags lwdsl's kernels and torch's choose by, its
core count, and whether the OS lets a process use AMX tiles.

`identity()` is what a probe record is keyed by: figures measured on another CPU (a copied home
folder, a migrated VM, a container image moved between hosts) are measured again. No torch here.
"""
from __future__ import annotations

import ctypes
import os
import platform
from functools import lru_cache
from pathlib import Path

# The /proc/cpuinfo flags that change which kernels run (lwdsl's ISA levels, torch/oneDNN's paths).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16")

_ARCH_REQ_XCOMP_PERM = 0x1023  # arch_prctl: ask for permission to use an extended state component
_XFEATURE_XTILEDATA = 18  # AMX tile data
_SYS_ARCH_PRCTL = 158  # x86-64


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(text: str, name: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    return frozenset((_field(_cpuinfo(), "flags") or "").split())


@lru_cache(maxsize=1)
def model_name() -> str:
    return _field(_cpuinfo(), "model name") or platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def amx_granted() -> bool:
    """Whether this process may use AMX tiles: the CPU has them and Linux granted the request for
    the tile-data state (arch_prctl(ARCH_REQ_XCOMP_PERM)); False, cleanly, anywhere else. oneDNN
    (torch's bf16 / int8 matmuls) makes the same request itself before it uses them."""
    if not {"amx_tile", "amx_bf16"} & cpu_flags() or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def identity() -> dict:
    """What a probe measured: CPU model, its ISA flags, logical cores, AMX usable or not."""
    return {"model": model_name(), "isa": sorted(cpu_flags() & set(ISA_FLAGS)),
            "cores": os.cpu_count() or 1, "amx": amx_granted()}
