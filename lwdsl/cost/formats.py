"""Bytes of a weight under a storage format and a prune choice. Pure; no torch.

Storage conventions (the executor stores exactly this; tests pin the numbers):
- fp32 / fp16 / bf16: the values, nothing else (a `group` or `asymmetric` is meaningless there).
- fp8, int8, int4, nf4, int2: values packed per row (`ceil(in · bits / 8)` bytes a row) plus one fp16
  scale per group of `group` input channels (per output row when `group` is None), plus one fp16
  zero point per group when asymmetric. So int4 group 128 = 4 + 16/128 bits a weight, asymmetric
  4 + 32/128 (the GPTQ/AWQ group layout, scales and zeros kept in half precision as torchao does).
- prune channels / heads: the matrix really shrinks (`pruned_shape`), then the format applies.
- prune unstructured: stored dense, so no byte is saved (a sparse storage format would be needed).
- prune 2:4: half the values kept plus 2 bits of position metadata per kept value
  (NVIDIA's semi-structured sparsity layout, cuSPARSELt / torch `to_sparse_semi_structured`).
"""
from __future__ import annotations

import math

from lwdsl.solution import PruneChoice, QuantFormat

# Bits of one stored value, per dtype (IEEE / OCP FP8 / NF4 of QLoRA, Dettmers et al. 2023).
VALUE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "nf4": 4, "int2": 2}
FLOAT_DTYPES = frozenset({"fp32", "fp16", "bf16"})
SCALE_BYTES = 2  # one fp16 scale (and one fp16 zero point when asymmetric) per group
SPARSE_24_META_BITS = 2  # per kept value in the 2:4 layout
UNSTRUCTURED_NOTE = "unstructured sparsity is stored dense: it saves no bytes without a sparse format"

# Which input dimension a channel / head prune removes from, per role: ("out" | "in").
_CHANNEL_DIM = {"mlp_gate": "out", "mlp_up": "out", "mlp_down": "in"}
_HEAD_DIM = {"attn_q": "out", "attn_k": "out", "attn_v": "out", "attn_o": "in"}


def quantized(fmt: QuantFormat) -> bool:
    """True for formats stored as codes plus scales (fp8 and the integer / nf4 formats)."""
    return fmt.dtype not in FLOAT_DTYPES


def bits_per_weight(fmt: QuantFormat, in_features: int) -> float:
    """Stored bits per weight including scales and zeros (ignoring row padding).

    >>> bits_per_weight(QuantFormat(dtype="int4", group=128), 4096)
    4.125
    """
    bits = float(VALUE_BITS[fmt.dtype])
    if quantized(fmt):
        per_group = SCALE_BYTES * 8 * (1 if fmt.symmetric else 2)
        bits += per_group / (fmt.group or in_features)
    return bits


def format_applies(shape: tuple[int, ...], fmt: QuantFormat) -> str | None:
    """None when `fmt` can store a weight of this shape, else the reason in words.

    >>> format_applies((1536, 576), QuantFormat(dtype="int4", group=128))
    'group 128 does not divide the input dimension 576'
    """
    if fmt.dtype == "fp32":
        return None
    if len(shape) != 2:
        return f"{fmt.label()} applies to matrices; this weight has shape {list(shape)}"
    if fmt.group is not None and quantized(fmt):
        if fmt.group <= 0 or shape[1] % fmt.group:
            return f"group {fmt.group} does not divide the input dimension {shape[1]}"
    return None


def kept(count: int, fraction: float, unit: int = 1) -> int:
    """What a prune of `fraction` keeps of `count` channels, removing whole units, at least one unit."""
    units = count // unit
    removed = min(int(units * fraction + 1e-9), units - 1)
    return (units - removed) * unit


def pruned_shape(shape: tuple[int, ...], role: str, prune: PruneChoice,
                 head_dim: int | None = None) -> tuple[int, ...]:
    """The shape after a channel or head prune; other prune kinds keep the shape.

    Channels: MLP intermediate channels (gate/up rows, down columns). Heads: whole heads of
    `head_dim` (q/k/v rows, o columns); with GQA, the caller gives each role its own fraction of heads.
    """
    if len(shape) != 2 or prune.kind not in ("channels", "heads") or prune.fraction <= 0:
        return tuple(shape)
    table = _CHANNEL_DIM if prune.kind == "channels" else _HEAD_DIM
    side = table.get(role)
    if side is None:
        return tuple(shape)
    unit = (head_dim or 1) if prune.kind == "heads" else 1
    out_features, in_features = shape
    if side == "out":
        return kept(out_features, prune.fraction, unit), in_features
    return out_features, kept(in_features, prune.fraction, unit)


def stored_bytes(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Bytes of a dense weight of `shape` in `fmt` (rows packed to whole bytes, scales and zeros)."""
    if len(shape) != 2:
        return math.prod(shape) * VALUE_BITS[fmt.dtype] // 8 if fmt.dtype in FLOAT_DTYPES else math.prod(shape) * 4
    rows, cols = shape
    value_bytes = rows * math.ceil(cols * VALUE_BITS[fmt.dtype] / 8)
    if not quantized(fmt):
        return value_bytes
    groups_per_row = math.ceil(cols / (fmt.group or cols))
    return value_bytes + rows * groups_per_row * SCALE_BYTES * (1 if fmt.symmetric else 2)


def weight_bytes(shape: tuple[int, ...], fmt: QuantFormat, prune: PruneChoice | None = None,
                 role: str | None = None, head_dim: int | None = None) -> int:
    """Bytes of one weight stored in `fmt` after `prune` (the shape is the unpruned (out, in)).

    >>> weight_bytes((576, 576), QuantFormat(dtype="int4", group=64))
    176256
    """
    prune = prune or PruneChoice()
    shape = pruned_shape(shape, role or "", prune, head_dim) if role else tuple(shape)
    if prune.kind == "2:4" and len(shape) == 2:
        rows, cols = shape
        values = stored_bytes((rows, cols // 2), fmt)  # half the values (scales per the halved row)
        return values + rows * math.ceil((cols // 2) * SPARSE_24_META_BITS / 8)
    return stored_bytes(shape, fmt)


def compute_dtype(fmt: QuantFormat, activation_dtype: str = "fp32") -> str:
    """The dtype the matmul of a layer stored in `fmt` runs at (the rate it gets on a device).

    int8 runs on integer kernels (`torch._int_mm`, activations quantized per token: SmoothQuant's
    W8A8 scheme); fp8 on fp8 units; fp16/bf16 as themselves; the sub-byte formats (int4, nf4, int2)
    are dequantized to the activation dtype first (weight-only, as torchao / bitsandbytes do).
    """
    if fmt.dtype in ("int8", "fp8", "fp16", "bf16"):
        return fmt.dtype
    return activation_dtype
