"""Time of one piece of work on a device or a link. Pure; no torch.

The roofline (Williams, Waterman, Patterson, CACM 2009): a kernel takes max(FLOPs / peak rate,
bytes moved / memory bandwidth). Transfers: bytes / link rate + latency. Collectives: ring all-reduce.
"""
from __future__ import annotations

import math

from lwdsl.hardware.records import DeviceSpec, LinkSpec


def roofline_s(flops: float, bytes_moved: float, device: DeviceSpec, dtype: str, rate: float | None = None) -> float:
    """max(FLOPs / rate, bytes / bandwidth) on `device` at compute `dtype` (Williams et al. 2009);
    `rate`: the FLOP/s this kernel was measured at (a prefill's skinny matmul), instead of the peak."""
    rate = device.rate(dtype) if rate is None else rate
    if rate <= 0 or device.bandwidth_Bps <= 0:
        return math.inf
    return max(flops / rate, bytes_moved / device.bandwidth_Bps)


def linear_flops(tokens: int, shape: tuple[int, int]) -> float:
    """2 · tokens · out · in: one multiply and one add per weight per token (Kaplan et al. 2020, §2.1)."""
    out_features, in_features = shape
    return 2.0 * tokens * out_features * in_features


def attention_flops(batch: int, heads: int, head_dim: int, queries: int, keys: float) -> float:
    """QKᵀ and PV: 2 · 2 · batch · heads · head_dim · queries · keys (Kaplan et al. 2020, Table 1)."""
    return 4.0 * batch * heads * head_dim * queries * keys


# Activation values the eager elementwise ops of one Llama-layout block (the executor's lean prefill,
# `lwdsl.runtime.generate.LeanLlama.forward`) read plus write per prompt token, per output feature of
# the linear whose output they consume. Each op counts its inputs read and its output written once:
#   q: the rotary embedding (neg of half, cat, x·cos, rotated·sin, add: 10) + the attention output's
#      transpose-copy back to rows (2); k: rotary (10) + the write into the KV cache (2); v: that write;
#   o, down: the residual add (3) + the RMS norm that reads the sum (2); gate: SiLU (2); up: the product (3).
# The probe times the same ops and counts them with this table, so its bytes/s prices them here.
LEAN_ELEMENTWISE_VALUES = {"attn_q": 12, "attn_k": 12, "attn_v": 2, "attn_o": 5,
                           "mlp_gate": 2, "mlp_up": 3, "mlp_down": 5}


# The same count for Gemma 3's block in the lean loop (`lwdsl.runtime.generate.LeanGemma`), where each
# norm is one op (2) and there are four a block plus norms of each query and key head:
#   q: its head norm (2) + rotary (10) + the attention output's copy back to rows (2); k: its head norm
#      (2) + rotary (10) + the cache write (2); v: the cache write (2);
#   o, down: the norm of the sublayer's output (2) + the residual add (3) + the next norm reading the sum (2);
#   gate: GELU (2, read and written: counted as any op, though its tanh costs more per value); up: the product (3).
# Priced at the probe's elementwise bytes/s for the Llama block's ops (the same kinds of op).
ELEMENTWISE_VALUES = {
    "gemma3_text": {"attn_q": 14, "attn_k": 14, "attn_v": 2, "attn_o": 7, "mlp_gate": 2, "mlp_up": 3, "mlp_down": 7},
}


def lean_elementwise_values(hidden: int, q_width: int, kv_width: int, inner: int) -> int:
    """Values a Llama-layout block's elementwise ops read and write per token (see the table above)."""
    v = LEAN_ELEMENTWISE_VALUES
    return ((v["attn_o"] + v["mlp_down"]) * hidden + v["attn_q"] * q_width
            + (v["attn_k"] + v["attn_v"]) * kv_width + (v["mlp_gate"] + v["mlp_up"]) * inner)


def transfer_s(nbytes: float, link: LinkSpec | None, transfers: int = 1) -> float:
    """Bytes over a link: nbytes / rate + latency per transfer (the α-β model, Hockney 1994).

    No link between the two devices: the transfer is impossible, `math.inf` (never free).
    """
    if nbytes <= 0:
        return 0.0
    if link is None or link.rate_Bps <= 0:
        return math.inf
    return nbytes / link.rate_Bps + transfers * link.latency_s


def allreduce_s(nbytes: float, ranks: int, link: LinkSpec | None) -> float:
    """Ring all-reduce of `nbytes` over `ranks`: 2·(p−1)/p · bytes / rate + 2·(p−1) · latency
    (Patarasuk & Yuan 2009; the bus-bandwidth convention of nccl-tests' PERFORMANCE.md)."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    if link is None or link.rate_Bps <= 0:
        return math.inf
    steps = ranks - 1
    return 2.0 * steps / ranks * nbytes / link.rate_Bps + 2.0 * steps * link.latency_s
