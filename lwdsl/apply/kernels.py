"""Packed integer weights and the matmul kernels that read them, chosen by measurement.

Two layers of truth:
- the **stored** form (what `state_dict` and the artifact hold, what the cost model counts): int8
  codes `[out, in]`; int4 / nf4 as two nibbles a byte `[out, in/2]` (even input index in the low
  nibble); int2 as four codes a byte `[out, in/4]`; fp16 scales per output channel or per group of
  `group` input channels; asymmetric formats add an fp16 offset per group (`w = code * scale +
  offset`).
- the **runtime** form a kernel wants, made from the stored form by `prepare` (torch's int4pack layout
  is a permutation of the same nibbles; fbgemm's prepacked int8 holds the same int8 codes). A module
  keeps only one of the two alive, so resident memory stays the stored size.

`CANDIDATES[family]` lists every kernel that can run a family, as `(prepare, run)`;
`bench/bench_kernels.py` times them all on SmolLM2's shapes and `DISPATCH` records the winners.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from functools import lru_cache

import torch
import torch.nn.functional as F

SCALE_DTYPE = torch.float16
MIN_SCALE = 1e-7  # above fp16's smallest subnormal, so an all-zero block keeps a usable scale

# NF4 levels (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


@dataclass(frozen=True)
class Packed:
    """The stored form of one quantized weight: codes, scales, optional offsets, and the layout."""

    codes: torch.Tensor  # int8 [out, in] | uint8 [out, in*bits/8]
    scale: torch.Tensor  # fp16 [out] (per channel) or [out, in/group]
    offset: torch.Tensor | None  # fp16, same shape as scale; None when symmetric
    bits: int  # 8, 4 or 2
    group: int | None  # None: per output channel
    levels: str = "linear"  # "linear" codes, or "nf4" lookup levels
    in_features: int = 0


# --- bit packing ------------------------------------------------------------------------------------

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes `[out, in]` (each < 2**bits) into bytes `[out, in*bits/8]`, low bits first."""
    per_byte = 8 // bits
    grouped = codes.to(torch.uint8).reshape(codes.shape[0], -1, per_byte)
    packed = torch.zeros(grouped.shape[:2], dtype=torch.uint8)
    for slot in range(per_byte):
        packed |= grouped[..., slot] << (bits * slot)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_bits`: bytes `[out, n]` into codes `[out, n*8/bits]` (uint8)."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    slots = [(packed >> (bits * slot)) & mask for slot in range(per_byte)]
    return torch.stack(slots, dim=-1).reshape(packed.shape[0], -1)


# --- quantizing and dequantizing --------------------------------------------------------------------

def _grouped(weight: torch.Tensor, group: int | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    size = group or in_features
    return weight.reshape(out_features, in_features // size, size)


def quantize_linear_codes(weight: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> Packed:
    """Round-to-nearest linear codes with absmax (symmetric) or min/max (asymmetric) scales.

    Scales are rounded to fp16 before the codes are computed, so codes and stored scales agree.
    Symmetric codes use `[-2**(b-1)+1, 2**(b-1)-1]` for 8 bits and `[-2**(b-1), 2**(b-1)-1]` below
    (int4: -8..7 with the scale set by absmax/7, so the extra negative level is free).
    """
    blocks = _grouped(weight.float(), group)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        low = -top if bits == 8 else -(top + 1)
        scale = (blocks.abs().amax(-1) / top).clamp(min=MIN_SCALE).to(SCALE_DTYPE)
        codes = torch.round(blocks / scale.float()[..., None]).clamp(low, top)
        offset = None
    else:
        top = 2 ** bits - 1
        minimum, maximum = blocks.amin(-1), blocks.amax(-1)
        scale = ((maximum - minimum) / top).clamp(min=MIN_SCALE).to(SCALE_DTYPE)
        offset = minimum.to(SCALE_DTYPE)
        codes = torch.round((blocks - offset.float()[..., None]) / scale.float()[..., None]).clamp(0, top)
        low = 0
    codes = codes.reshape(weight.shape)
    squeeze = group is None
    scale = scale.squeeze(-1) if squeeze else scale
    offset = offset.squeeze(-1) if (offset is not None and squeeze) else offset
    if bits == 8:
        stored = codes.to(torch.int8)
    else:
        stored = pack_bits((codes - low).to(torch.uint8), bits)  # biased to unsigned for packing
    return Packed(stored, scale.contiguous(), None if offset is None else offset.contiguous(),
                  bits, group, "linear", weight.shape[1])


def quantize_nf4(weight: torch.Tensor, group: int | None) -> Packed:
    """NF4: absmax-normalised blocks, each value mapped to the nearest of the 16 NF4 levels."""
    blocks = _grouped(weight.float(), group)
    scale = blocks.abs().amax(-1).clamp(min=MIN_SCALE).to(SCALE_DTYPE)
    normalised = blocks / scale.float()[..., None]
    codes = (normalised[..., None] - NF4_LEVELS).abs().argmin(-1).reshape(weight.shape)
    scale = scale.squeeze(-1) if group is None else scale
    return Packed(pack_bits(codes, 4), scale.contiguous(), None, 4, group, "nf4", weight.shape[1])


def signed_codes(packed: Packed) -> torch.Tensor:
    """Integer codes `[out, in]` as the dequantisation formula uses them (float32)."""
    if packed.bits == 8:
        return packed.codes.float()
    codes = unpack_bits(packed.codes, packed.bits).float()
    if packed.levels == "nf4":
        return NF4_LEVELS[codes.long()]
    if packed.offset is None:  # symmetric: undo the bias added for packing
        codes -= 2 ** (packed.bits - 1)
    return codes


def dequantize(packed: Packed) -> torch.Tensor:
    """The float32 weight `[out, in]` the packed form stands for."""
    codes = signed_codes(packed)
    out_features, in_features = codes.shape
    size = packed.group or in_features
    blocks = codes.reshape(out_features, in_features // size, size)
    scale = packed.scale.float().reshape(out_features, -1, 1)
    weight = blocks * scale
    if packed.offset is not None:
        weight = weight + packed.offset.float().reshape(out_features, -1, 1)
    return weight.reshape(out_features, in_features)


def stored_bytes(packed: Packed) -> int:
    tensors = [packed.codes, packed.scale] + ([packed.offset] if packed.offset is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


# --- kernels: prepare (stored -> runtime) and run (x, runtime -> y) ---------------------------------

def _int8_prepare_plain(packed: Packed):
    return packed.codes, packed.scale.float(), packed.scale.to(torch.bfloat16)


def _int8_run_fp32(x, runtime):
    codes, scale, _ = runtime
    return torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), codes, scale).reshape(
        *x.shape[:-1], -1)


def _int8_run_bf16(x, runtime):
    codes, _, scale_bf16 = runtime
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    return torch.ops.aten._weight_int8pack_mm(flat, codes, scale_bf16).to(x.dtype).reshape(
        *x.shape[:-1], -1)


def _int8_prepare_fbgemm(packed: Packed):
    zeros = torch.zeros(packed.codes.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, fbgemm's kernel is not
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(packed.codes, packed.scale.double(), zeros, 0)
    return torch.ops.quantized.linear_prepack(qweight, None)


def _int8_run_fbgemm(x, runtime):
    return torch.ops.quantized.linear_dynamic(x, runtime, True)


def _int4_prepare(packed: Packed, dtype: torch.dtype):
    """torch's CPU int4pack layout: codes 0..15 with w = (code - 8) * scale + zero per group."""
    codes = unpack_bits(packed.codes, 4).to(torch.int32)
    scale = packed.scale.float()
    if packed.offset is None:
        zero = torch.zeros_like(scale)
    else:
        zero = packed.offset.float() + 8 * scale
    weight_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(dtype)
    return weight_packed, packed.group, scales_and_zeros


def _int4_run(x, runtime):
    weight_packed, group, scales_and_zeros = runtime
    flat = x.reshape(-1, x.shape[-1]).to(scales_and_zeros.dtype)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight_packed, group, scales_and_zeros)
    return out.to(x.dtype).reshape(*x.shape[:-1], -1)


def _dequant_prepare(packed: Packed):
    return packed


def _dequant_run(x, packed: Packed):
    return F.linear(x, dequantize(packed).to(x.dtype))


@lru_cache(maxsize=8)  # a fixed permutation per shape; finding it costs ~1 s
def _int4pack_source_index(out_features: int, in_features: int) -> torch.Tensor:
    """For each nibble of torch's int4pack layout, the flat `[out, in]` index it came from.

    The layout is a fixed permutation for a shape; it is found by packing the source index itself,
    four bits at a time, so no assumption about the kernel's blocking is built in.
    """
    source = torch.arange(out_features * in_features, dtype=torch.int64)
    found = torch.zeros(out_features * in_features, dtype=torch.int64)
    for shift in range(0, max(4, (out_features * in_features - 1).bit_length()), 4):
        digit = ((source >> shift) & 15).to(torch.int32).reshape(out_features, in_features)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
        found |= unpack_bits(packed.reshape(1, -1), 4).reshape(-1).to(torch.int64) << shift
    return found


def stored_codes(kernel: str, runtime, meta: Packed, shape: tuple[int, int]) -> torch.Tensor:
    """The stored codes of a weight whose only live copy is a kernel's runtime form."""
    out_features, in_features = shape
    if kernel == "fbgemm_dynamic":
        qweight, _ = torch.ops.quantized.linear_unpack(runtime)
        return qweight.int_repr().contiguous()
    if kernel.startswith("int4pack"):
        nibbles = unpack_bits(runtime[0].reshape(1, -1), 4).reshape(-1)
        codes = torch.empty(out_features * in_features, dtype=torch.uint8)
        codes[_int4pack_source_index(out_features, in_features)] = nibbles
        return pack_bits(codes.reshape(out_features, in_features), 4)
    raise ValueError(f"kernel {kernel} keeps the stored codes itself")


def _native_q4_run(x, packed: Packed):
    from lwdsl.apply import native

    return native.q4_linear(x, packed.codes, packed.scale, packed.offset, packed.group)


def _native_q8_run(x, packed: Packed):
    from lwdsl.apply import native

    return native.q8_linear(x, packed.codes, packed.scale)


def _native_q8g_run(x, packed: Packed):
    from lwdsl.apply import native

    return native.q8g_linear(x, packed.codes, packed.scale, packed.group)


def _int4_applies(packed: Packed) -> bool:
    return packed.levels == "linear" and packed.bits == 4 and packed.group is not None \
        and packed.group % 32 == 0 and packed.in_features % packed.group == 0


CANDIDATES = {
    "int8": {
        "int8pack_f32": (_int8_prepare_plain, _int8_run_fp32),
        "int8pack_bf16": (_int8_prepare_plain, _int8_run_bf16),
        "fbgemm_dynamic": (_int8_prepare_fbgemm, _int8_run_fbgemm),
        "dequant_fp32": (_dequant_prepare, _dequant_run),
        "native_q8": (_dequant_prepare, _native_q8_run),
    },
    "int8g": {  # int8 with a scale per group of 32k inputs (group 32: GGUF's Q8_0)
        "native_q8g": (_dequant_prepare, _native_q8g_run),
        "dequant_fp32": (_dequant_prepare, _dequant_run),
    },
    "int4": {
        "int4pack_f32": (lambda p: _int4_prepare(p, torch.float32), _int4_run),
        "int4pack_bf16": (lambda p: _int4_prepare(p, torch.bfloat16), _int4_run),
        "dequant_fp32": (_dequant_prepare, _dequant_run),
        "native_q4": (_dequant_prepare, _native_q4_run),
    },
}

# Kernels whose runtime form is the stored codes themselves (nothing to re-derive on save).
KEEPS_STORED = frozenset({"int8pack_f32", "int8pack_bf16", "dequant_fp32", "native_q8", "native_q4", "native_q8g"})

# For the benchmark: a representative packed weight per family (None where the shape does not fit).
QUANTIZERS = {
    "int8": lambda w: quantize_linear_codes(w, 8, None, True),
    "int4": lambda w: quantize_linear_codes(w, 4, 32, False) if w.shape[1] % 32 == 0 else None,
    "int8g": lambda w: quantize_linear_codes(w, 8, 32, True) if w.shape[1] % 32 == 0 else None,
}
DEQUANTIZERS = {"int8": dequantize, "int4": dequantize, "int8g": dequantize}


def family(packed: Packed) -> str:
    """Which kernel family can run this packed weight; `dequant` is the always-correct fallback."""
    if packed.bits == 8 and packed.group is None and packed.offset is None:
        return "int8"
    if _int4_applies(packed):
        return "int4"
    if packed.bits == 8 and packed.levels == "linear" and packed.offset is None and packed.group \
            and packed.group % 32 == 0 and packed.in_features % packed.group == 0:
        return "int8g"
    return "dequant"


# Winners of bench/bench_kernels.py on this machine (AMD EPYC, 2 shared cores, torch 2.13), per family
# and phase, in order of preference: the first one that can run here is used (`native_*` need the
# compiled `native.c`). The native kernels read the STORED layout, which is also what the fused decode
# step (`lwdsl.runtime.fused`) needs: with int4pack (prefill ~2x faster than native_q4 alone, decode
# within noise) only a permutation of the codes stays alive and every decode step would run the
# eager per-op path instead (5.6 against 18 ms a token on SmolLM2). fbgemm's W8A8 int8 is the fastest int8 prefill kernel but rounds activations
# per tensor: whole-model perplexity went from 20.0 to 62 (docs/BENCHMARKS.md), so it is never
# chosen. A module computes both phases from ONE runtime form: the prefill kernel is used only when
# it shares the decode kernel's `prepare` (int8: the plain codes), else the decode kernel does both.
DISPATCH = {
    ("int8", "decode"): ("native_q8", "int8pack_bf16"),
    ("int8", "prefill"): ("native_q8", "int8pack_bf16"),
    ("int4", "decode"): ("native_q4", "int4pack_bf16"),
    ("int4", "prefill"): ("native_q4", "int4pack_bf16"),
    ("int8g", "decode"): ("native_q8g", "dequant_fp32"),
    ("int8g", "prefill"): ("native_q8g", "dequant_fp32"),
    ("dequant", "decode"): ("dequant_fp32",),
    ("dequant", "prefill"): ("dequant_fp32",),
}


def _runnable(name: str, in_features: int) -> bool:
    if not name.startswith("native_"):
        return True
    from lwdsl.apply import native

    return in_features % 32 == 0 and native.available()  # native.c works in blocks of 32


def kernel_for(family_name: str, phase: str, in_features: int = 0):
    """`(name, (prepare, run))` of the preferred runnable kernel for a family and phase."""
    table = CANDIDATES.get(family_name, {"dequant_fp32": (_dequant_prepare, _dequant_run)})
    name = next(n for n in DISPATCH[(family_name, phase)] if _runnable(n, in_features))
    return name, table[name]


def padded_groups(in_features: int, group: int | None) -> int:
    return 1 if group is None else math.ceil(in_features / group)
