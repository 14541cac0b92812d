"""Time of one piece of work on a device or a link. Pure; no torch.

The roofline (Williams, Waterman, Patterson, CACM 2009): a kernel takes max(FLOPs / peak rate,
bytes moved / memory bandwidth). Transfers: bytes / link rate + latency. Collectives: ring all-reduce.
"""
from __future__ import annotations

import math

from lwdsl.hardware.records import DeviceSpec, LinkSpec


def roofline_s(flops: float, bytes_moved: float, device: DeviceSpec, dtype: str) -> float:
    """max(FLOPs / rate, bytes / bandwidth) on `device` at compute `dtype` (Williams et al. 2009)."""
    rate = device.rate(dtype)
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
