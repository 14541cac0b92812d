"""lwdsl's own x86 kernels (`native.c`: packed-weight matmuls; `native_step.c`: a whole Llama decode
step in one call), compiled with the system C compiler and loaded by ctypes.

They read the STORED layouts of `kernels.py` directly (nibbles two a byte, fp16 scales and offsets),
so a module using them keeps one copy of its weight.

One library per instruction-set level (`LEVELS`), the same sources compiled with that level's flags
(the differences live in `native_simd.h` and small `#if` blocks): AVX2+FMA+F16C, and AVX-512
(F/BW/VL/DQ) with VNNI, where the integer dot products are one `vpdpbusd` instead of two multiply-adds
(the same exact integers: results do not depend on the level). The level run is the highest one this
CPU has (its `/proc/cpuinfo` flags), or the one `LWDSL_NATIVE_ISA` names if lower
(`LWDSL_NATIVE_ISA=avx2` runs the AVX2 build on an AVX-512 machine). Built on first use into
`$LWDSL_CACHE/native/<source hash>/` (default `~/.cache/lwdsl/native/...`), written to a temporary
name and renamed, or ahead of time with `python -m lwdsl.apply.native` (scripts/setup.sh does: every
level the compiler supports). Where there is no compiler, no AVX2/FMA/F16C (or not x86), or the build
fails, `available()` is False and every plan runs torch's kernels instead (the probe then measures
those, so the cost model prices them): nothing else changes.

Prefill (from `DEQUANT_ROWS` activation rows on) dequantizes a layer and runs torch's matmul in
`prefill_dtype()`: bfloat16 where this CPU multiplies it faster than float32 (AVX512-BF16 or AMX
through oneDNN: the probe measures both and records the choice), else float32. The prefill's attention
core (`prefill_attention`, `LeanLlama`'s) has its own measured choice: torch's CPU flash attention in
bfloat16 runs AMX tiles on a Xeon (~3x float32) but is slower than float32 on a Zen 4.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

SOURCES = (Path(__file__).with_name("native.c"), Path(__file__).with_name("native_step.c"),
           Path(__file__).with_name("native_prefill.c"))
HEADERS = (Path(__file__).with_name("native_simd.h"),)  # included by the sources: part of the build's hash
COMMON_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# Instruction-set levels, lowest first: (name, compiler flags, /proc/cpuinfo flags the CPU must have).
# The AVX-512 builds keep most kernels' 256-bit vectors (their layouts are 32-byte blocks; the decode
# step's int8 rows, `LW_AVX512` in native_simd.h, read two blocks at once) and tell the compiler to
# prefer 256 bits for its own loops: EVEX encodings and VNNI without 512-bit frequency
# drops on Intel parts.
_AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
           "-mprefer-vector-width=256"]
LEVELS = (
    ("avx2", ["-mavx2", "-mfma", "-mf16c"], frozenset({"avx2", "fma", "f16c"})),
    ("avx512", _AVX512,
     frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"})),
    ("avx512bf16", _AVX512 + ["-mavx512bf16"],
     frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                "avx512_bf16"})),
)
FLAGS = COMMON_FLAGS + LEVELS[0][1]  # the AVX2 build's (kept for callers that name one build)


def level(flags: frozenset[str] | set[str] | None = None, forced: str | None = None) -> str | None:
    """The highest level a CPU with `flags` (default: this one's) runs, no higher than `forced`
    (default: `LWDSL_NATIVE_ISA`); None where it has not even AVX2/FMA/F16C (or is not x86)."""
    from lwdsl.hardware.cpu import cpu_flags

    have = cpu_flags() if flags is None else frozenset(flags)
    forced = os.environ.get("LWDSL_NATIVE_ISA") if forced is None else forced
    names = [name for name, _, _ in LEVELS]
    ceiling = names.index(forced) if forced in names else len(names) - 1
    fitting = [name for name, _, needed in LEVELS[: ceiling + 1] if needed <= have]
    return fitting[-1] if fitting else None


def _cpu_supports() -> bool:
    return level() is not None


def _flags(name: str) -> list[str]:
    return COMMON_FLAGS + next(flags for level_name, flags, _ in LEVELS if level_name == name)


def library_path(name: str | None = None) -> Path:
    """Where the library of ISA level `name` (default: the one this CPU runs, else AVX2) is cached."""
    name = name or level() or LEVELS[0][0]
    base = os.environ.get("LWDSL_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "lwdsl"
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS)
                            + " ".join(_flags(name)).encode()).hexdigest()[:16]
    return root / "native" / digest / f"liblwdsl_native_{name}.so"


def build(name: str | None = None) -> Path:
    """Compile the sources for ISA level `name` (default: this CPU's) into the cache (atomically);
    returns the library's path."""
    target = library_path(name)
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *_flags(name or level() or LEVELS[0][0]), *map(str, SOURCES), "-o", partial],
                       check=True, capture_output=True)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def build_all() -> dict[str, str]:
    """Every level's library the compiler can build (set-up time): level -> path, or why not."""
    built = {}
    for name, _, _ in LEVELS:
        try:
            built[name] = str(build(name))
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            built[name] = f"not built: {getattr(error, 'stderr', b'') or error}"[:300]
    return built


def loaded_level() -> str | None:
    """The ISA level of the library in use (None: torch's kernels run everything)."""
    library = _library()
    return None if library is None else library.lwdsl_level


@lru_cache(maxsize=1)
def _library():
    if os.environ.get("LWDSL_NATIVE", "1") == "0" or not _cpu_supports():
        return None
    names = [name for name, _, _ in LEVELS]
    library = None
    for name in reversed(names[: names.index(level()) + 1]):  # the CPU's level, else the next lower build
        try:
            library = ctypes.CDLL(str(build(name)))  # torch is imported: its libgomp is the one bound
            library.lwdsl_level = name
            break
        except (OSError, RuntimeError, subprocess.CalledProcessError):
            continue
    if library is None:
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
    library.lwdsl_q4_dequant_bf16.argtypes = library.lwdsl_q4_dequant.argtypes
    library.lwdsl_q8_dequant_bf16.argtypes = library.lwdsl_q8_dequant.argtypes
    library.lwdsl_q4_dequant_bf16.restype = library.lwdsl_q8_dequant_bf16.restype = None
    library.lwdsl_llama_step.argtypes = [ctypes.POINTER(LwModel), pointer, integer, pointer]
    library.lwdsl_llama_step.restype = integer
    library.lwdsl_linear_row.argtypes = [ctypes.POINTER(LwLinear), pointer, pointer, integer]
    library.lwdsl_linear_row.restype = integer
    return library


# --- the fused decode step's description (mirrors the structs of native_step.c) -------------------

class LwLinear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("group", ctypes.c_int),
                ("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class LwBlock(ctypes.Structure):
    _fields_ = [(name, LwLinear) for name in ("q", "k", "v", "o", "gate", "up", "down")] + [
        ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
        ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("attn_out_norm", ctypes.c_void_p),
        ("mlp_out_norm", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
        ("cache_len", ctypes.c_int)]


class LwModel(ctypes.Structure):
    _fields_ = [("blocks", ctypes.c_int), ("hidden", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("max_len", ctypes.c_int), ("threads", ctypes.c_int), ("eps", ctypes.c_float),
                ("attention_scale", ctypes.c_float), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("head", LwLinear), ("block", ctypes.POINTER(LwBlock)),
                ("max_rows", ctypes.c_int), ("max_features", ctypes.c_int), ("activation", ctypes.c_int)]


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


def _dequant_buffer(rows: int, columns: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This thread's matrix (float32 or bfloat16) for one dequantized layer, grown to the largest
    asked for and reused: a fresh ~3 MB allocation per layer came back from the kernel as new pages
    every prefill (~425 MB of page faults for SmolLM2), and made a prefill's time swing with the
    machine's memory state. Valid until this thread's next dequantization in that dtype. Where autograd
    records (a forward that trains, e.g. `recover distill`'s student), a fresh matrix: the backward
    keeps the weight, which the next layer's dequantization would overwrite in a shared buffer (and one
    made under `inference_mode` cannot be saved for backward at all)."""
    if torch.is_grad_enabled():
        return torch.empty(rows, columns, dtype=dtype)
    name = f"buffer_{dtype}"
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < rows * columns:
        buffer = torch.empty(rows * columns, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[: rows * columns].view(rows, columns)


def q4_dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int,
                  in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float32 (or bfloat16) weight of an int4 layer, in this thread's reused buffer."""
    weight = _dequant_buffer(codes.shape[0], in_features, dtype)
    run = _library().lwdsl_q4_dequant if dtype == torch.float32 else _library().lwdsl_q4_dequant_bf16
    run(codes.data_ptr(), scale.data_ptr(), None if offset is None else offset.data_ptr(), codes.shape[0],
        in_features, group, weight.data_ptr())
    return weight


def q8_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float32 (or bfloat16) weight of an int8 layer, in this thread's reused buffer."""
    weight = _dequant_buffer(*codes.shape, dtype)
    run = _library().lwdsl_q8_dequant if dtype == torch.float32 else _library().lwdsl_q8_dequant_bf16
    run(codes.data_ptr(), scale.data_ptr(), codes.shape[0], codes.shape[1], weight.data_ptr())
    return weight


PREFILL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What a prefill runs in a dtype the probe chooses, and the probe record's key for each choice: the
# native int layers' dequantized matmul, and the attention core (`scaled_dot_product_attention`; in
# bfloat16 its CPU flash kernel runs AMX tiles where the CPU has them, ~3x float32 on a Xeon, while
# on a Zen 4's AVX512-BF16 it measured slower than float32).
PREFILL_PARTS = {"int": "int_dtype", "attention": "attention_dtype"}


@lru_cache(maxsize=None)
def _probed_prefill_dtypes(part: str = "int") -> dict[int, str]:
    from lwdsl.hardware.probe import cached_prefill_dtype

    return cached_prefill_dtype(key=PREFILL_PARTS[part])


def probed_prefill_dtypes() -> dict[str, dict[int, str]]:
    """Every part's choice by rows from this CPU's current probe (what a solution is priced with)."""
    return {part: chosen for part in PREFILL_PARTS if (chosen := _probed_prefill_dtypes(part))}


_carried: dict[str, dict[int, str]] = {}


def carry_prefill_dtypes(chosen: dict[str, dict[int, str]]) -> None:
    """The dtypes a loaded artifact's solution was priced with (`Solution.prefill_dtypes`): what this
    process's prefills run wherever no current probe of this CPU chooses (a re-probe under way, a
    cache cleared or of an older version), so the executor runs what was predicted."""
    _carried.clear()
    _carried.update({part: {int(rows): name for rows, name in table.items()} for part, table in chosen.items()})


def prefill_dtype(rows: int = 512, part: str = "int") -> torch.dtype:
    """The dtype a prefill of `rows` activation rows runs `part` in ("int": the native int layers'
    dequantized matmul; "attention": the attention core): `LWDSL_PREFILL_DTYPE` (fp32 | bf16) where set
    (both parts), else the probe's choice for this CPU at the measured row count nearest to `rows`
    (`lwdsl probe` times both dtypes on the same synthetic prefill and records the faster:
    `prefill.int_dtype`, `prefill.attention_dtype`), else the loaded artifact's priced choice
    (`carry_prefill_dtypes`), else float32 (nothing measured here yet)."""
    forced = os.environ.get("LWDSL_PREFILL_DTYPE")
    if forced in PREFILL_DTYPES:
        return PREFILL_DTYPES[forced]
    chosen = _probed_prefill_dtypes(part) or _carried.get(part)
    if not chosen:
        return torch.float32
    nearest = min(chosen, key=lambda measured: abs(math.log2(measured) - math.log2(max(rows, 1))))
    return PREFILL_DTYPES.get(chosen[nearest], torch.float32)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      dtype: torch.dtype | None = None, scale: float | None = None,
                      window: int | None = None) -> torch.Tensor:
    """Causal attention of a prefill's queries `q` [batch, heads, rows, dim] over `keys`/`values`
    [batch, kv heads, positions, dim] (the queries are the last `rows` positions; grouped kv heads are
    shared), out in `q`'s dtype, computed in `dtype` (default `prefill_dtype(rows, "attention")`): bfloat16
    operands with float32 softmax and accumulation inside torch's flash kernel. `scale` defaults to
    dim ** -0.5; with a sliding `window`, a query sees the `window` positions up to its own."""
    if dtype is None:  # the probe measured this CPU: elsewhere (a placed block on a GPU) as given
        dtype = prefill_dtype(q.shape[-2], "attention") if q.device.type == "cpu" else q.dtype
    rows, positions = q.shape[-2], keys.shape[-2]
    mask = None  # SDPA's `is_causal` aligns the mask top-left: queries after earlier positions need theirs
    if 1 < rows < positions:
        mask = torch.ones(rows, positions, dtype=torch.bool, device=q.device).tril(positions - rows)
    if window is not None and window < positions:  # bottom-right aligned band: (query - window, query]
        band = torch.ones(rows, positions, dtype=torch.bool, device=q.device)
        mask = band.tril(positions - rows).triu(positions - rows - window + 1)
    extra = {"attn_mask": mask} if mask is not None else {"is_causal": rows > 1}
    if scale is not None:
        extra["scale"] = scale
    attend = torch.nn.functional.scaled_dot_product_attention
    if dtype == q.dtype:
        return attend(q, keys, values, enable_gqa=keys.shape[1] != q.shape[1], **extra)
    return attend(q.to(dtype), keys.to(dtype), values.to(dtype), enable_gqa=keys.shape[1] != q.shape[1],
                  **extra).to(q.dtype)


def prefill_linear(flat: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`flat @ weight.T` for a prefill (float32 in and out) in `dtype` (default `prefill_dtype()`):
    bfloat16 operands run torch's bf16 matmul (oneDNN: AMX or AVX512-BF16 where the CPU has them);
    `weight` may already be in `dtype` (the native dequantization writes bfloat16 directly)."""
    dtype = dtype or prefill_dtype(flat.shape[0])
    if dtype == torch.float32:
        return torch.nn.functional.linear(flat, weight.float())
    return torch.nn.functional.linear(flat.to(dtype), weight.to(dtype)).float()


def _row(x: torch.Tensor, flat: torch.Tensor, described: "LwLinear") -> torch.Tensor:
    """One activation row (a decode step that is not fused) through the fused step's own row kernels
    (`lwdsl_linear_row`: four rows at a time, prefetched, shared by the threads): the per-row GEMM
    kernels below ran a Gemma 3 decode's int4 layers at ~8 GB/s where the step's kernels stream 22-26."""
    out = torch.empty(described.N)
    if _library().lwdsl_linear_row(ctypes.byref(described), flat.data_ptr(), out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("native linear: no scratch memory")
    return out.reshape(*x.shape[:-1], described.N).to(x.dtype)


def q4_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
              group: int) -> torch.Tensor:
    """`x @ W.T` for an int4 weight in its stored form (`kernels.Packed` fields)."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    rows, in_features = flat.shape
    out_features = codes.shape[0]
    if rows >= DEQUANT_ROWS:
        dtype = prefill_dtype(rows)
        weight = q4_dequantize(codes, scale, offset, group, in_features, dtype)
        return prefill_linear(flat, weight, dtype).reshape(*x.shape[:-1], out_features).to(x.dtype)
    if rows == 1:
        return _row(x, flat, LwLinear(2, out_features, in_features, group, codes.data_ptr(), scale.data_ptr(),
                                      None if offset is None else offset.data_ptr(), None))
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
        dtype = prefill_dtype(rows)
        weight = q8_dequantize(codes, scale, dtype)
        return prefill_linear(flat, weight, dtype).reshape(*x.shape[:-1], out_features).to(x.dtype)
    if rows == 1:
        return _row(x, flat, LwLinear(1, out_features, in_features, 0, codes.data_ptr(), scale.data_ptr(), None, None))
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
    if rows == 1:
        return _row(x, flat, LwLinear(3, out_features, in_features, group, codes.data_ptr(), scale.data_ptr(),
                                      None, None))
    out = torch.empty(rows, out_features)
    _library().lwdsl_q8g_gemm(flat.data_ptr(), rows, in_features, codes.data_ptr(), scale.data_ptr(),
                              out_features, group, out.data_ptr())
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


if __name__ == "__main__":
    for built_level, where in build_all().items():
        print(f"{built_level}: {where}")
    print(f"this CPU runs: {level() or 'torch kernels (no AVX2/FMA/F16C)'}")
