"""Bytes of every format, pinned to hand-computed values; KV cache; the invariants as properties."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwdsl.cost import formats, memory
from lwdsl.cost.formats import format_applies, pruned_shape, weight_bytes
from lwdsl.inventory import architecture_entry
from lwdsl.inventory.configs import arch_from_config
from lwdsl.solution import PruneChoice, QuantFormat


def fmt(dtype: str, group: int | None = None, symmetric: bool = True) -> QuantFormat:
    return QuantFormat(dtype=dtype, group=group, symmetric=symmetric)


# (shape, format, bytes): values packed per row + one fp16 scale per group (+ one fp16 zero if asymmetric)
PINNED = [
    ((1536, 576), fmt("fp32"), 1536 * 576 * 4),  # 3,538,944
    ((1536, 576), fmt("fp16"), 1_769_472),
    ((49152, 576), fmt("bf16"), 56_623_104),
    ((1536, 576), fmt("int8"), 884_736 + 1536 * 2),  # per output channel: one scale a row
    ((576, 576), fmt("fp8"), 331_776 + 576 * 2),
    ((1536, 576), fmt("int4", 64), 1536 * 288 + 1536 * 9 * 2),  # 470,016
    ((1536, 576), fmt("int4", 64, False), 1536 * 288 + 1536 * 9 * 2 * 2),  # 497,664
    ((576, 1536), fmt("int4", 128), 576 * 768 + 576 * 12 * 2),  # 456,192 = 4.125 bits a weight
    ((576, 1536), fmt("int4", 128, False), 576 * 768 + 576 * 12 * 4),  # 4.25 bits a weight
    ((576, 1536), fmt("nf4", 64), 576 * 768 + 576 * 24 * 2),
    ((576, 1536), fmt("int2", 32), 576 * 384 + 576 * 48 * 2),  # 276,480
    ((576, 1536), fmt("int4"), 576 * 768 + 576 * 2),
    ((10, 7), fmt("int4"), 10 * 4 + 10 * 2),  # odd rows pad to whole bytes: ceil(7·4/8) = 4
]


@pytest.mark.parametrize("shape, quant, expected", PINNED, ids=[f"{s}-{q.label()}" for s, q, _ in PINNED])
def test_weight_bytes_pinned(shape, quant, expected):
    assert weight_bytes(shape, quant) == expected


def test_int4_g128_is_4_125_bits_a_weight():
    assert weight_bytes((4096, 4096), fmt("int4", 128)) * 8 / (4096 * 4096) == 4 + 16 / 128
    assert weight_bytes((4096, 4096), fmt("int4", 128, False)) * 8 / (4096 * 4096) == 4 + 32 / 128
    assert formats.bits_per_weight(fmt("int4", 128), 4096) == 4.125


def test_group_must_divide_the_input_dimension():
    assert format_applies((1536, 576), fmt("int4", 128)) == "group 128 does not divide the input dimension 576"
    assert format_applies((576, 1536), fmt("int4", 128)) is None
    assert format_applies((1536, 576), fmt("int4", 64)) is None
    assert format_applies((576,), fmt("int8")) is not None
    assert format_applies((576,), fmt("fp32")) is None


def test_pruning_shrinks_or_says_it_saves_nothing():
    quarter = PruneChoice(kind="channels", fraction=0.25)
    assert pruned_shape((1536, 576), "mlp_gate", quarter) == (1152, 576)
    assert pruned_shape((576, 1536), "mlp_down", quarter) == (576, 1152)
    assert pruned_shape((576, 576), "attn_q", quarter) == (576, 576)  # channels prune only the MLP
    assert weight_bytes((1536, 576), fmt("fp32"), quarter, "mlp_up") == 1152 * 576 * 4
    heads = PruneChoice(kind="heads", fraction=0.34)
    assert pruned_shape((576, 576), "attn_q", heads, head_dim=64) == (384, 576)  # 3 of 9 heads
    assert pruned_shape((576, 576), "attn_o", heads, head_dim=64) == (576, 384)
    half = PruneChoice(kind="unstructured", fraction=0.5)
    assert weight_bytes((576, 576), fmt("fp32"), half) == 576 * 576 * 4  # stored dense
    assert "saves no bytes" in formats.UNSTRUCTURED_NOTE
    # 2:4 keeps half the values plus 2 bits of position per kept value
    assert weight_bytes((576, 576), fmt("fp16"), PruneChoice(kind="2:4")) == 576 * 288 * 2 + 576 * 72


def test_kv_cache_per_token_respects_gqa():
    smollm2 = arch_from_config(architecture_entry("smollm2-135m")["config"])
    assert memory.kv_bytes_per_token(smollm2, fmt("fp32")) == 2 * 30 * 3 * 64 * 4  # 46,080
    assert memory.kv_bytes_per_token(smollm2, fmt("fp16")) == 23_040
    assert memory.kv_bytes_per_token(smollm2, fmt("int8")) == 2 * 30 * 3 * (64 + 2)
    llama3 = arch_from_config(architecture_entry("llama-3.1-8b")["config"])
    assert memory.kv_bytes_per_token(llama3, fmt("bf16")) == 128 * 1024  # the well-known 128 KiB
    assert memory.kv_cache_bytes(llama3, fmt("bf16"), batch=4, tokens=1000) == 4 * 1000 * 131_072


BIT_ORDER = ["int2", "int4", "int8", "fp16", "fp32"]


@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, 4096), cols_blocks=st.integers(1, 64), group_exp=st.integers(4, 8),
       low=st.integers(0, 4), high=st.integers(0, 4), grouped=st.booleans(), symmetric=st.booleans())
def test_more_bits_never_fewer_bytes(rows, cols_blocks, group_exp, low, high, grouped, symmetric):
    group = 2**group_exp if grouped else None
    cols = cols_blocks * 256
    a, b = sorted((low, high))
    small = weight_bytes((rows, cols), fmt(BIT_ORDER[a], group, symmetric))
    large = weight_bytes((rows, cols), fmt(BIT_ORDER[b], group, symmetric))
    assert small <= large
    # and a zero point or a smaller group never saves bytes
    if BIT_ORDER[a] not in ("fp16", "fp32"):
        assert weight_bytes((rows, cols), fmt(BIT_ORDER[a], group, True)) <= \
            weight_bytes((rows, cols), fmt(BIT_ORDER[a], group, False))
        assert weight_bytes((rows, cols), fmt(BIT_ORDER[a], 256)) <= weight_bytes((rows, cols), fmt(BIT_ORDER[a], 16))


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 2048), cols=st.integers(1, 2048), fraction=st.floats(0, 0.9))
def test_pruning_more_never_costs_more_bytes(rows, cols, fraction):
    less = weight_bytes((rows, cols), fmt("int8"), PruneChoice(kind="channels", fraction=fraction / 2), "mlp_up")
    more = weight_bytes((rows, cols), fmt("int8"), PruneChoice(kind="channels", fraction=fraction), "mlp_up")
    assert 0 < more <= less
