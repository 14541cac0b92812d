"""Offload: weights that live on disk (or in host memory) and stream to the computing device per forward.

At apply time the handler only marks a module (`lwdsl_offload = "disk" | "host"`); the artifact then
writes the marked modules' tensors to `offload.safetensors` instead of the resident weights file.
At load time `attach_streaming` replaces each marked module with a `StreamedModule` placeholder.
Placeholders are grouped in units (a transformer block's offloaded modules form one unit); calling
any module of a unit makes that unit resident, drops the previous one, and starts reading the next
unit (cyclically) on a background thread, so at most two units are in memory at once.

Disk reads go by byte range through the safetensors header (`os.pread` into fresh tensors), not
through a memory map: mapped file pages would count in the process's resident memory until unmapped,
while read pages stay in the kernel's page cache, so the resident set really holds only the two
units in flight. Host storage keeps the tensors in (pinned, when a GPU computes) host memory and
copies them to the compute device per forward; on a CPU-only machine that saves nothing (said so).

    attach_streaming(model, "artifact/offload.safetensors", units, build)
"""
from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lwdsl.apply.registry import ApplyContext, register
from lwdsl.errors import fail

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
           "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "F8_E4M3": torch.float8_e4m3fn, "F64": torch.float64, "BOOL": torch.bool}


@dataclass(frozen=True)
class OffloadChoice:
    """Where an offloaded layer's weights live: `disk` (a file, streamed) or `host` memory."""

    storage: Literal["disk", "host"]
    device: str = ""  # the plan's device name it lives on


@register(OffloadChoice)
def offload_module(module: nn.Module, choice: OffloadChoice, ctx: ApplyContext) -> nn.Module:
    """Mark `module` for offload; the artifact stores it apart and `load` streams it."""
    if isinstance(module, nn.Embedding):
        raise fail("E631", f"{ctx.name}: offloading an embedding is not implemented (it would stream the "
                   f"whole table for a few rows a token)", hint="keep the embedding on the computing device")
    if not module.state_dict():
        raise fail("E630", f"{ctx.name}: nothing to offload in a {type(module).__name__}")
    module.lwdsl_offload = choice.storage
    return module


class TensorFile:
    """Tensors of one safetensors file, read by byte range (no memory map)."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        self.entries, self.data_start = header, 8 + size
        self.fd = os.open(self.path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str, pin: bool = False) -> torch.Tensor:
        entry = self.entries[key]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8, pin_memory=pin)  # 64-byte aligned
        view = memoryview(buffer.numpy())
        done = 0
        while done < end - start:
            done += os.preadv(self.fd, [view[done:]], self.data_start + start + done)
        return buffer.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self) -> None:
        os.close(self.fd)

    def nbytes(self, key: str) -> int:
        start, end = self.entries[key]["data_offsets"]
        return end - start


class StreamedModule(nn.Module):
    """Stands where an offloaded module was; runs the real module of its unit, made resident on call."""

    def __init__(self, streamer: "Streamer", unit: int, name: str, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.unit, self.module_name = unit, name
        self.__dict__["streamer"] = streamer  # not a submodule: holds no state of its own

    def forward(self, *args, **kwargs):
        return self.streamer.acquire(self.unit)[self.module_name](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.module_name}, unit={self.unit}, streamed"


class Streamer:
    """Makes one unit resident at a time and prefetches the next on a background thread."""

    def __init__(self, units: list[list[str]], load_tensors: Callable[[str], dict[str, torch.Tensor]],
                 build: Callable[[str, dict[str, torch.Tensor]], nn.Module], device="cpu",
                 prefetch: bool = True):
        self.units, self.load_tensors, self.build = units, load_tensors, build
        self.device, self.prefetch = torch.device(device), prefetch
        self.current: int | None = None
        self.modules: dict[str, nn.Module] = {}
        self.pending: tuple[int, Future] | None = None
        self.loads = 0  # units read so far (a test / benchmark figure)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lwdsl-prefetch")
        self._lock = threading.Lock()

    def _load(self, unit: int) -> dict[str, nn.Module]:
        modules = {}
        for name in self.units[unit]:
            tensors = {k: v.to(self.device, non_blocking=True) for k, v in self.load_tensors(name).items()}
            modules[name] = self.build(name, tensors)
        self.loads += 1
        return modules

    def acquire(self, unit: int) -> dict[str, nn.Module]:
        with self._lock:
            if self.current == unit:
                return self.modules
            if self.pending is not None and self.pending[0] == unit:
                modules = self.pending[1].result()
            else:
                if self.pending is not None:
                    self.pending[1].result()  # let a stale read finish before starting another
                modules = self._load(unit)
            self.pending = None
            self.current, self.modules = unit, modules  # the previous unit is released here
            following = (unit + 1) % len(self.units)
            if self.prefetch and following != unit:
                self.pending = (following, self._pool.submit(self._load, following))
            return modules

    def release(self) -> None:
        """Drop every resident unit (e.g. between requests)."""
        with self._lock:
            if self.pending is not None:
                self.pending[1].result()
            self.current, self.modules, self.pending = None, {}, None


def units_by_block(names: list[str]) -> list[list[str]]:
    """Offloaded module names grouped by transformer block (`model.layers.N.`), in model order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:3]) if len(parts) > 3 and parts[1] == "layers" else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _return_freed_buffers() -> None:
    """Pin glibc's mmap threshold at 1 MiB so each freed weight buffer goes back to the system.

    glibc raises the threshold to the size of the last freed mapped block (up to 32 MiB); streamed
    weights would then be carved from the heap, whose freed holes are kept, and the resident set
    would creep above the two units in flight. Elsewhere (not glibc) this does nothing.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def attach_streaming(model: nn.Module, names: list[str], shapes: dict[str, tuple[int, int]],
                     load_tensors: Callable[[str], dict[str, torch.Tensor]],
                     build: Callable[[str, dict[str, torch.Tensor]], nn.Module], device="cpu",
                     prefetch: bool = True) -> Streamer:
    """Replace each named module of `model` with a `StreamedModule` reading through `load_tensors`."""
    _return_freed_buffers()
    units = units_by_block(names)
    streamer = Streamer(units, load_tensors, build, device, prefetch)
    for unit, members in enumerate(units):
        for name in members:
            out_features, in_features = shapes[name]
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, StreamedModule(streamer, unit, name, in_features, out_features))
    model.__dict__["lwdsl_streamer"] = streamer
    return streamer


def module_tensors(file: TensorFile, name: str, pin: bool = False) -> dict[str, torch.Tensor]:
    """A module's state-dict tensors from an offload file (keys `name.<key>`), keyed by `<key>`."""
    prefix = name + "."
    return {key[len(prefix):]: file.read(key, pin) for key in file.keys() if key.startswith(prefix)}


def host_store(file: TensorFile, names: list[str], pin: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Host storage: every named module's tensors read once into (pinned) host memory."""
    return {name: module_tensors(file, name, pin) for name in names}
