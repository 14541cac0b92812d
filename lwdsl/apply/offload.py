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
import time
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

_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


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


DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: multiples of the logical block size (<= 4 KiB)
RUN_GAP = 64 << 10  # tensors this close in the file are read in one call (the gap is read and dropped)


class TensorFile:
    """Tensors of one safetensors file, read by byte range (no memory map).

    `direct=True` (disk offload): reads bypass the kernel's page cache (O_DIRECT, the way DeepSpeed's
    NVMe offload reads), so a streamed block costs a real read from the disk every time it is needed
    and its pages are not kept in memory behind the process's back. Where the file system refuses
    O_DIRECT, reads are buffered and the range is dropped from the cache after each read instead.
    """

    def __init__(self, path, direct: bool = False, pool: "BufferPool | None" = None):
        self.path = str(path)
        with open(self.path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        self.entries, self.data_start = header, 8 + size
        self.fd = os.open(self.path, os.O_RDONLY)
        self.direct = direct
        self.direct_fd = _open_direct(self.path) if direct else None
        self.pool = pool

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str, pin: bool = False) -> torch.Tensor:
        return self.read_many([key], pin)[key]

    def read_many(self, keys: list[str], pin: bool = False) -> dict[str, torch.Tensor]:
        """The tensors of `keys`; tensors lying together in the file come in one read."""
        spans = sorted((*self.entries[key]["data_offsets"], key) for key in keys)
        runs: list[list] = []
        for start, end, key in spans:
            if runs and start - runs[-1][1] <= RUN_GAP:
                runs[-1][1] = max(runs[-1][1], end)
                runs[-1][2].append((start, end, key))
            else:
                runs.append([start, end, [(start, end, key)]])
        tensors = {}
        for first, last, members in runs:
            data = self._read_range(self.data_start + first, self.data_start + last, pin)
            for start, end, key in members:
                tensors[key] = _typed(data[start - first:end - first], self.entries[key])
        return tensors

    def _read_range(self, start: int, end: int, pin: bool) -> torch.Tensor:
        """Bytes [start, end) of the file as a uint8 tensor."""
        if self.direct_fd is not None and not pin:
            try:
                return _read_direct(self.direct_fd, start, end, self.pool)
            except OSError:  # the file system took the open but not the read: buffered from now on
                os.close(self.direct_fd)
                self.direct_fd = None
        buffer = self.pool.take(end - start) if self.pool is not None and not pin else \
            torch.empty(end - start, dtype=torch.uint8, pin_memory=pin)  # 64-byte aligned
        if _read_into(self.fd, memoryview(buffer.numpy()), start) < end - start:
            raise fail("E653", f"{self.path}: the file ends inside a tensor", hint="write the artifact again")
        if self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
        return buffer

    def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None

    def nbytes(self, key: str) -> int:
        start, end = self.entries[key]["data_offsets"]
        return end - start


def _open_direct(path: str) -> int | None:
    """A descriptor that reads past the page cache, or None where the system has no O_DIRECT."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:  # e.g. tmpfs
        return None


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset` (fewer bytes only at the end of the file); the bytes read."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def _read_direct(fd: int, start: int, end: int, pool: "BufferPool | None" = None) -> torch.Tensor:
    """Bytes [start, end) through an O_DIRECT descriptor: the block-aligned range around them is read
    into a block-aligned buffer, and the view of the asked bytes is returned."""
    first = start - start % DIRECT_ALIGN
    last = -(-end // DIRECT_ALIGN) * DIRECT_ALIGN
    region = pool.take(last - first) if pool is not None else _aligned(last - first)
    got = _read_into(fd, memoryview(region.numpy()), first)
    if got < end - first:
        raise OSError(f"short read: {got} of {end - first} bytes")
    return region[start - first:end - first]


def _aligned(nbytes: int) -> torch.Tensor:
    """A fresh uint8 buffer of `nbytes` starting on a `DIRECT_ALIGN` boundary."""
    buffer = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8)
    pad = -buffer.data_ptr() % DIRECT_ALIGN
    return buffer[pad:pad + nbytes]


def _users(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class BufferPool:
    """Read buffers kept for the next unit: a fresh buffer's pages are faulted in by the kernel on
    first touch (measured here: 52 ms of CPU per 105 MB, more than the int8 decode step itself),
    a reused one's are not. A buffer is handed out again only when nothing made from it is alive
    (its storage has no user but the pool), so a module that kept a view of its weights is safe."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self.buffers: list[tuple[torch.Tensor, int]] = []  # (aligned buffer, its users when idle)
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            for buffer, idle in self.buffers:
                if buffer.numel() >= nbytes and _users(buffer) == idle:
                    return buffer[:nbytes]
            fresh = _aligned(nbytes)
            if len(self.buffers) >= self.keep:  # forget one still in use elsewhere (it lives on with its
                busy = [k for k, (b, idle) in enumerate(self.buffers) if _users(b) != idle]  # users), else the oldest
                del self.buffers[busy[0] if busy else 0]
            self.buffers.append((fresh, _users(fresh)))
            return fresh[:nbytes]


def write_tensor_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file laid out for streaming: each block's tensors together (one read a unit),
    the largest first within a block, and the data starting on a `DIRECT_ALIGN` boundary (the header
    padded with spaces, as the format allows), so O_DIRECT reads land the tensors aligned and no copy
    is needed. `safetensors.torch.load_file` reads it like any other."""
    def order(key: str):
        parts = key.split(".")
        block = int(parts[2]) if len(parts) > 3 and parts[1] == "layers" and parts[2].isdigit() else -1
        nbytes = tensors[key].numel() * tensors[key].element_size()
        return block, nbytes % 64 != 0, -nbytes, key

    header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    keys = sorted(tensors, key=order)
    for key in keys:
        tensor = tensors[key]
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % DIRECT_ALIGN)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for key in keys:
            data = tensors[key].detach().contiguous().cpu()
            handle.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else b"")


def _typed(data: torch.Tensor, entry: dict) -> torch.Tensor:
    """A safetensors entry's tensor from its bytes; copied where the bytes sit off a 64-byte boundary
    (torch's integer kernels fault on codes that are not aligned)."""
    if data.data_ptr() % 64:
        data = data.clone()
    return data.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


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

    def __init__(self, units: list[list[str]], load_tensors: Callable[[list[str]], dict[str, dict[str, torch.Tensor]]],
                 build: Callable[[str, dict[str, torch.Tensor]], nn.Module], device="cpu",
                 prefetch: bool = True):
        self.units, self.load_tensors, self.build = units, load_tensors, build
        self.device, self.prefetch = torch.device(device), prefetch
        self.current: int | None = None
        self.modules: dict[str, nn.Module] = {}
        self.pending: tuple[int, Future] | None = None
        self.loads = 0  # units read so far (a test / benchmark figure)
        self.read_bytes, self.read_s = 0, 0.0  # what the reads took (`lwdsl check` reports the rate)
        self.rebound: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]] = {}  # see `_module`
        self.empties: dict = {}  # see `_empty`
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lwdsl-prefetch")
        self._lock = threading.Lock()

    def _read(self, unit: int) -> dict[str, dict[str, torch.Tensor]]:
        """A unit's tensors, read and moved to the computing device (on the prefetch thread)."""
        start = time.perf_counter()
        read = self.load_tensors(self.units[unit])
        self.read_s += time.perf_counter() - start
        self.read_bytes += sum(t.numel() * t.element_size() for stored in read.values() for t in stored.values())
        self.loads += 1
        return {name: {k: v.to(self.device, non_blocking=True) for k, v in stored.items()}
                for name, stored in read.items()}

    def acquire(self, unit: int) -> dict[str, nn.Module]:
        """The modules of `unit`, resident. The previous unit is released first (its work is done), the
        next unit's read starts as soon as this one's has arrived, and this one's modules are built
        (cheap: views of the read tensors) while it runs, so a disk-bound stream reads back to back."""
        with self._lock:
            if self.current == unit:
                return self.modules
            self._release()  # its buffers may take the next read
            if self.pending is not None and self.pending[0] == unit:
                stored = self.pending[1].result()
            else:
                if self.pending is not None:
                    self.pending[1].result()  # let a stale read finish before starting another
                stored = self._read(unit)
            self.pending = None
            following = (unit + 1) % len(self.units)
            if self.prefetch and following != unit:
                self.pending = (following, self._pool.submit(self._read, following))
            self.current, self.modules = unit, {name: self._module(name, tensors) for name, tensors in stored.items()}
            return self.modules

    def _module(self, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """The module of `name` over freshly read tensors. Building one costs ~75 us of Python (15 ms a
        token for SmolLM2's 210 streamed linears), so a module whose state is exactly the tensors it
        was built from (its kernel keeps the stored form) is built once and then re-pointed at each
        new read (`Tensor.set_`); others are built anew."""
        kept = self.rebound.get(name)
        if kept is not None:
            module, live = kept
            with torch.no_grad():
                for key, tensor in tensors.items():
                    live[key].set_(tensor)
            return module
        own = {key: tensor.detach() for key, tensor in tensors.items()}  # new tensor objects, same memory:
        module = self.build(name, own)  # re-pointing them never touches the caller's (a host store's)
        state = module.state_dict(keep_vars=True)
        if set(state) == set(own) and all(state[key] is tensor for key, tensor in own.items()):
            self.rebound[name] = (module, own)
        return module

    def _empty(self, like: torch.Tensor) -> torch.Tensor:
        """One empty tensor per dtype and device, made once: a fresh one per release would be a small
        long-lived allocation among a prefill's transient ones, and glibc could then not hand the
        freed heap back (measured: +50 MB resident)."""
        key = (like.dtype, like.device)
        if key not in self.empties:
            self.empties[key] = torch.empty(0, dtype=like.dtype, device=like.device)
        return self.empties[key]

    def _release(self) -> None:
        """Let go of the resident unit: its re-pointable modules drop their storage (kept modules would
        otherwise hold every unit's buffers), the others go with the references."""
        with torch.no_grad():
            for name in self.modules:
                kept = self.rebound.get(name)
                if kept is not None:
                    for tensor in kept[1].values():
                        tensor.set_(self._empty(tensor))
        self.current, self.modules = None, {}

    def release(self) -> None:
        """Drop every resident unit (e.g. between requests)."""
        with self._lock:
            if self.pending is not None:
                self.pending[1].result()
            self._release()
            self.pending = None


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
                     load_tensors: Callable[[list[str]], dict[str, dict[str, torch.Tensor]]],
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


def unit_tensors(file: TensorFile, names: list[str], pin: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """The state-dict tensors of modules `names` from an offload file (keys `name.<key>`), by module,
    keyed by `<key>`; read together (a block's tensors lie together in the file: one or two reads)."""
    prefixes = {name + ".": name for name in names}
    wanted = {key: name for key in file.keys() for prefix, name in prefixes.items() if key.startswith(prefix)}
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, tensor in file.read_many(list(wanted), pin).items():
        name = wanted[key]
        tensors[name][key[len(name) + 1:]] = tensor
    return tensors

