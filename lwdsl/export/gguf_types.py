"""Which lwdsl storage a GGUF type holds exactly, and the bytes of that type made from lwdsl's stored
form (no torch math on the values: codes and fp16 scales are moved, never recomputed).

    lwdsl format            GGUF type   block of 32: bytes            value
    int8 group 32           Q8_0        d fp16, q int8[32]             d * q
    int4 group 32           Q4_0        d fp16, nibbles[16]            d * (q - 8)
    int4 group 32 asym      Q4_1        d fp16, m fp16, nibbles[16]    d * q + m
    fp16 / bf16 / fp32      F16 / BF16 / F32

lwdsl's symmetric int4 stores `code + 8` (0..15) with `w = (nibble - 8) * scale`, and its asymmetric
int4 `w = nibble * scale + offset` with fp16 scale and offset: the same numbers as Q4_0's and Q4_1's.
Only the nibble order differs: lwdsl packs input k = 2i, 2i+1 into byte i (low, high); a GGUF block
packs k = j and j + 16 into byte j. The tests check every mapping against `gguf.quants`' own
dequantizer on the same values.
"""
from __future__ import annotations

import numpy as np

from lwdsl.solution import QuantFormat

# lwdsl format -> the GGUF type that holds it exactly
EXACT = {
    ("int8", 32, True): "Q8_0",
    ("int4", 32, True): "Q4_0",
    ("int4", 32, False): "Q4_1",
}
CAST_TYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
# the lwdsl format each GGUF quantized type stands for (for predictions and messages)
FORMAT_OF = {"Q8_0": QuantFormat(dtype="int8", group=32), "Q4_0": QuantFormat(dtype="int4", group=32),
             "Q4_1": QuantFormat(dtype="int4", group=32, symmetric=False)}
EXACT_TABLE = "int8 group 32 -> Q8_0, int4 group 32 -> Q4_0, int4 group 32 asymmetric -> Q4_1, fp16 -> F16, " \
              "bf16 -> BF16, fp32 -> F32 (or the source's own type where it holds the values exactly)"


def exact_type(fmt: QuantFormat, levels_linear: bool = True) -> str | None:
    """The GGUF type holding `fmt`'s stored values exactly, or None."""
    if fmt.dtype in CAST_TYPES:
        return CAST_TYPES[fmt.dtype]
    if not levels_linear:
        return None
    return EXACT.get((fmt.dtype, fmt.group, fmt.symmetric))


def nearest_type(fmt: QuantFormat) -> str:
    """The GGUF type a format is re-quantized to with `--requantize`."""
    if fmt.dtype in ("int8", "fp8"):
        return "Q8_0"
    return "Q4_0" if fmt.symmetric and fmt.dtype != "nf4" else "Q4_1"


def _nibbles_in_gguf_order(codes: np.ndarray) -> np.ndarray:
    """lwdsl's packed nibbles `[N, K/2]` (k = 2i low, 2i+1 high) as GGUF blocks' `[N, K/32, 16]`
    bytes (k = j low, j + 16 high within each block of 32)."""
    rows = codes.shape[0]
    low, high = codes & 0x0F, codes >> 4
    values = np.stack([low, high], axis=-1).reshape(rows, -1, 2, 16)  # [N, blocks, halves, 16]
    return (values[:, :, 0, :] | (values[:, :, 1, :] << 4)).astype(np.uint8)


def _half_bytes(values: np.ndarray, rows: int) -> np.ndarray:
    return np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(rows, -1, 2)


def encode(type_name: str, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """The GGUF bytes `[N, K/32 * block bytes]` of a stored weight (lwdsl layout, numpy arrays; scales
    fp16 `[N, K/32]`)."""
    rows = codes.shape[0]
    d = _half_bytes(scale, rows)
    if type_name == "Q8_0":
        q = np.ascontiguousarray(codes.astype(np.int8)).view(np.uint8).reshape(rows, -1, 32)
        parts = [d, q]
    elif type_name == "Q4_0":
        parts = [d, _nibbles_in_gguf_order(codes)]
    elif type_name == "Q4_1":
        parts = [d, _half_bytes(offset, rows), _nibbles_in_gguf_order(codes)]
    else:
        raise ValueError(f"no stored-form encoding for {type_name}")
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def float_bytes(type_name: str, values: np.ndarray) -> np.ndarray:
    """A float32 array in F32 / F16 / BF16 (the values must already be exact in that type)."""
    from gguf import GGMLQuantizationType, quants

    if type_name == "F32":
        return values.astype(np.float32)
    if type_name == "F16":
        return values.astype(np.float16)
    return quants.quantize(values.astype(np.float32), GGMLQuantizationType[type_name])


def exact_float_type(values: np.ndarray, candidates: tuple[str, ...]) -> tuple[str, np.ndarray]:
    """The first of `candidates` (then F16, BF16) that holds float32 `values` bit-exactly, with its
    bytes; F32 when none does. Checked by quantizing and dequantizing with `gguf.quants`."""
    from gguf import GGMLQuantizationType, quants

    values = np.ascontiguousarray(values, dtype=np.float32)
    for name in (*candidates, "F16", "BF16"):
        qtype = GGMLQuantizationType[name]
        if name not in ("F16", "BF16", "F32") and values.shape[-1] % 32:
            continue
        try:
            data = quants.quantize(values, qtype)
            back = quants.dequantize(data, qtype)
        except (NotImplementedError, quants.QuantError):
            continue
        if np.array_equal(back.reshape(values.shape), values):
            return name, data
    return "F32", values
