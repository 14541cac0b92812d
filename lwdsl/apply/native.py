"""lwdsl's own AVX2 kernels (`native.c`: packed-weight matmuls; `native_step.c`: a whole Llama decode
step in one call), compiled once with the system C compiler and loaded by ctypes.

They read the STORED layouts of `kernels.py` directly (nibbles two a byte, fp16 scales and offsets),
so a module using them keeps one copy of its weight. Built on first use into
`$LWDSL_CACHE/native/<source hash>/` (default `~/.cache/lwdsl/native/...`), written to a temporary
name and renamed, or ahead of time with `python -m lwdsl.apply.native` (scripts/setup.sh does).
Where there is no compiler, no AVX2/FMA/F16C, or the build fails, `available()` is False and the
torch kernels are used instead: nothing else changes.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

SOURCES = (Path(__file__).with_name("native.c"), Path(__file__).with_name("native_step.c"))
HEADERS = (Path(__file__).with_name("native_simd.h"),)  # included by the sources: part of the build's hash
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
_NEEDED_CPU_FLAGS = {"avx2", "fma", "f16c"}


def _cpu_supports() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return _NEEDED_CPU_FLAGS <= set(flags)


def library_path() -> Path:
    base = os.environ.get("LWDSL_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "lwdsl"
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS)
                            + " ".join(FLAGS).encode()).hexdigest()[:16]
    return root / "native" / digest / "liblwdsl_native.so"


def build() -> Path:
    """Compile `native.c` into the cache (atomically); returns the library's path."""
    target = library_path()
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", partial], check=True, capture_output=True)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


@lru_cache(maxsize=1)
def _library():
    if os.environ.get("LWDSL_NATIVE", "1") == "0" or not _cpu_supports():
        return None
    try:
        library = ctypes.CDLL(str(build()))  # torch is imported: its libgomp is the one bound
    except (OSError, RuntimeError, subprocess.CalledProcessError):
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.lwdsl_q4_gemm.argtypes = [pointer, integer, integer, pointer, pointer, pointer, integer,
                                      integer, pointer]
    library.lwdsl_q8_gemm.argtypes = [pointer, integer, integer, pointer, pointer, integer, pointer]
    library.lwdsl_q4_gemm.restype = library.lwdsl_q8_gemm.restype = None
    library.lwdsl_q4_dequant.argtypes = [pointer, pointer, pointer, integer, integer, integer, pointer]
    library.lwdsl_q8_dequant.argtypes = [pointer, pointer, integer, integer, pointer]
    library.lwdsl_q4_dequant.restype = library.lwdsl_q8_dequant.restype = None
    library.lwdsl_q8g_gemm.argtypes = [pointer, integer, integer, pointer, pointer, integer, integer, pointer]
    library.lwdsl_q8g_dequant.argtypes = [pointer, pointer, integer, integer, integer, pointer]
    library.lwdsl_q8g_gemm.restype = library.lwdsl_q8g_dequant.restype = None
    library.lwdsl_llama_step.argtypes = [ctypes.POINTER(LwModel), pointer, integer, pointer]
    library.lwdsl_llama_step.restype = integer
    return library


# --- the fused decode step's description (mirrors the structs of native_step.c) -------------------

class LwLinear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("group", ctypes.c_int),
                ("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class LwBlock(ctypes.Structure):
    _fields_ = [(name, LwLinear) for name in ("q", "k", "v", "o", "gate", "up", "down")] + [
        ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int)]


class LwModel(ctypes.Structure):
    _fields_ = [("blocks", ctypes.c_int), ("hidden", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("max_len", ctypes.c_int), ("threads", ctypes.c_int), ("eps", ctypes.c_float),
                ("attention_scale", ctypes.c_float), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("head", LwLinear), ("block", ctypes.POINTER(LwBlock)),
                ("max_rows", ctypes.c_int), ("max_features", ctypes.c_int)]


def llama_step(model: LwModel, hidden: torch.Tensor, position: int, logits: torch.Tensor) -> None:
    """One decode step (see `native_step.c`): `hidden` [hidden] float32 in (the token's embedding),
    overwritten; `logits` [vocab] float32 out; the KV cache the description points at gains `position`."""
    if _library().lwdsl_llama_step(ctypes.byref(model), hidden.data_ptr(), position, logits.data_ptr()):
        raise MemoryError("native decode step: no scratch memory")


def available() -> bool:
    return _library() is not None


# From this many activation rows on (prefill), a layer is dequantized into one transient float32
# matrix and multiplied by the float matmul: integer dot products per row cost ~2x that for a 64-token
# prompt (int4, SmolLM2), and the float path does not round the activations.
DEQUANT_ROWS = 16


_scratch = threading.local()


def _dequant_buffer(rows: int, columns: int) -> torch.Tensor:
    """This thread's float32 matrix for one dequantized layer, grown to the largest asked for and
    reused: a fresh ~3 MB allocation per layer came back from the kernel as new pages every prefill
    (~425 MB of page faults for SmolLM2), and made a prefill's time swing with the machine's memory
    state. Valid until this thread's next dequantization."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < rows * columns:
        _scratch.buffer = buffer = torch.empty(rows * columns)
    return buffer[: rows * columns].view(rows, columns)


def q4_dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int,
                  in_features: int) -> torch.Tensor:
    """The float32 weight of an int4 layer, in this thread's reused buffer (`_dequant_buffer`)."""
    weight = _dequant_buffer(codes.shape[0], in_features)
    _library().lwdsl_q4_dequant(codes.data_ptr(), scale.data_ptr(), None if offset is None else offset.data_ptr(),
                                codes.shape[0], in_features, group, weight.data_ptr())
    return weight


def q8_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight of an int8 layer, in this thread's reused buffer (`_dequant_buffer`)."""
    weight = _dequant_buffer(*codes.shape)
    _library().lwdsl_q8_dequant(codes.data_ptr(), scale.data_ptr(), codes.shape[0], codes.shape[1],
                                weight.data_ptr())
    return weight


def q4_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
              group: int) -> torch.Tensor:
    """`x @ W.T` for an int4 weight in its stored form (`kernels.Packed` fields)."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    rows, in_features = flat.shape
    out_features = codes.shape[0]
    if rows >= DEQUANT_ROWS:
        weight = q4_dequantize(codes, scale, offset, group, in_features)
        return torch.nn.functional.linear(flat, weight).reshape(*x.shape[:-1], out_features).to(x.dtype)
    out = torch.empty(rows, out_features)
    _library().lwdsl_q4_gemm(flat.data_ptr(), rows, in_features, codes.data_ptr(), scale.data_ptr(),
                             None if offset is None else offset.data_ptr(), out_features, group,
                             out.data_ptr())
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


def q8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x @ W.T` for an int8 per-channel weight in its stored form."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    rows, in_features = flat.shape
    out_features = codes.shape[0]
    if rows >= DEQUANT_ROWS:
        weight = q8_dequantize(codes, scale)
        return torch.nn.functional.linear(flat, weight).reshape(*x.shape[:-1], out_features).to(x.dtype)
    out = torch.empty(rows, out_features)
    _library().lwdsl_q8_gemm(flat.data_ptr(), rows, in_features, codes.data_ptr(), scale.data_ptr(),
                             out_features, out.data_ptr())
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


def q8g_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """`x @ W.T` for an int8 weight with a scale per group of `group` inputs (32: GGUF's Q8_0)."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    rows, in_features = flat.shape
    out_features = codes.shape[0]
    if rows >= DEQUANT_ROWS:
        weight = _dequant_buffer(out_features, in_features)
        _library().lwdsl_q8g_dequant(codes.data_ptr(), scale.data_ptr(), out_features, in_features, group,
                                     weight.data_ptr())
        return torch.nn.functional.linear(flat, weight).reshape(*x.shape[:-1], out_features).to(x.dtype)
    out = torch.empty(rows, out_features)
    _library().lwdsl_q8g_gemm(flat.data_ptr(), rows, in_features, codes.data_ptr(), scale.data_ptr(),
                              out_features, group, out.data_ptr())
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


if __name__ == "__main__":
    print(build() if _cpu_supports() else "this CPU lacks AVX2/FMA/F16C: the torch kernels will be used")
