"""KV cache, activations and workspace bytes for inference. Pure; no torch.

All counts are for the HF eager implementation in the activation dtype of the run.
"""
from __future__ import annotations

import math

from lwdsl.cost.formats import SCALE_BYTES, VALUE_BITS, quantized
from lwdsl.inventory.records import ArchNumbers
from lwdsl.solution import QuantFormat

ACTIVATION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# What `check` measures runs above these counts by a few percent (allocator slack, the runtime's own
# buffers): +1.0% to +2.8% on SmolLM2, +1.6% to +4.0% on Qwen2.5-Coder-0.5B and -0.3% to +3.5% on
# Gemma-3-270M (docs/BENCHMARKS.md). A `require { memory ... <= X }` line is planned against
# X · (1 - MEASURED_MARGIN), so a solution that fills its bound still meets it when measured;
# predictions themselves stay unadjusted.
MEASURED_MARGIN = 0.04


def kv_bytes_per_token_layer(arch: ArchNumbers, kv_format: QuantFormat) -> int:
    """Bytes one token adds to one layer's KV cache: K and V, kv_heads · head_dim each (GQA/MQA).

    Quantized KV keeps one fp16 scale (and zero when asymmetric) per `group` values of a head vector,
    per head vector when `group` is None (KIVI / vLLM-style per-token-per-head scales).
    """
    head_vector = math.ceil(arch.head_dim * VALUE_BITS[kv_format.dtype] / 8)
    if quantized(kv_format):
        groups = math.ceil(arch.head_dim / (kv_format.group or arch.head_dim))
        head_vector += groups * SCALE_BYTES * (1 if kv_format.symmetric else 2)
    return 2 * arch.kv_heads * head_vector  # 2·kv_heads·head_dim·bytes (K and V)


def kv_bytes_per_token(arch: ArchNumbers, kv_format: QuantFormat) -> int:
    """2 · layers · kv_heads · head_dim · bytes per token (Pope et al. 2022, "Efficiently Scaling
    Transformer Inference", §2), plus the quantization scales."""
    return arch.layers * kv_bytes_per_token_layer(arch, kv_format)


def kv_cache_bytes(arch: ArchNumbers, kv_format: QuantFormat, batch: int, tokens: int) -> int:
    """The whole cache for `batch` sequences of `tokens` (context + generate) tokens."""
    return batch * tokens * kv_bytes_per_token(arch, kv_format)


def _layer_live_width(arch: ArchNumbers) -> int:
    """Values per token alive at once inside a block: residual + normed input, q/k/v, and the MLP
    intermediate (gate, up and their product) — the peak of an eager forward."""
    q_out, kv_out = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    mlp = 3 * arch.intermediate if arch.gated_mlp else 2 * arch.intermediate
    return 2 * arch.hidden + max(q_out + 2 * kv_out + arch.hidden, mlp)


def activation_bytes_prefill(arch: ArchNumbers, batch: int, context: int, act: str = "fp32") -> int:
    """Peak activation bytes of a prefill: one block's live tensors for all prompt tokens, one head-set
    of attention scores (eager attention materialises batch·heads·context² scores and their softmax),
    and the logits of the last position (what generation keeps)."""
    width = ACTIVATION_BYTES[act]
    tokens = batch * context
    scores = 2 * batch * arch.heads * context * context
    return width * (tokens * _layer_live_width(arch) + scores) + 4 * batch * arch.vocab


def activation_bytes_decode(arch: ArchNumbers, batch: int, positions: int, act: str = "fp32") -> int:
    """Peak activation bytes of one decode step attending over `positions` cached tokens."""
    width = ACTIVATION_BYTES[act]
    scores = 2 * batch * arch.heads * positions
    return width * (batch * _layer_live_width(arch) + scores) + 4 * batch * arch.vocab


def activation_bytes(arch: ArchNumbers, batch: int, context: int, generate: int, act: str = "fp32") -> int:
    """Inference peak activations and workspace: the larger of prefill and the last decode step."""
    return max(activation_bytes_prefill(arch, batch, context, act),
               activation_bytes_decode(arch, batch, context + generate, act))


def activation_bytes_per_shard(arch: ArchNumbers, batch: int, context: int, generate: int, act: str = "fp32",
                               tensor_parallel: int = 1) -> int:
    """`activation_bytes` on one device of a tensor-parallel group: Megatron-LM splits the heads (their
    q/k/v and attention scores) and the MLP intermediate across the group; the residual stream stays whole."""
    if tensor_parallel <= 1:
        return activation_bytes(arch, batch, context, generate, act)
    shard = arch.model_copy(update={"heads": max(1, arch.heads // tensor_parallel),
                                    "kv_heads": max(1, arch.kv_heads // tensor_parallel),
                                    "intermediate": max(1, arch.intermediate // tensor_parallel)})
    return activation_bytes(shard, batch, context, generate, act)
