"""Static KV caches for the decode loop: float, or int8 codes with a scale per token and head.

A cache is preallocated for `max_len` positions (no growth, no copies while decoding). `update`
writes the keys/values of new positions and returns the keys/values of all positions so far, as
float tensors for attention. The int8 cache stores codes `[batch, kv_heads, max_len, head_dim]` and
one fp16 absmax scale per (batch, kv_head, position): 1 + 2/head_dim bytes a value instead of 4, so
its bytes are what `kv_cache_bytes` reports and what the cost model counts for an int8 KV format
(per-token symmetric scales, as in KIVI / vLLM's fp8-kv "per-token-head" layout).

    cache = kv_cache_for(QuantFormat(dtype="int8"), layers=30, batch=1, kv_heads=3, max_len=512, head_dim=64)
"""
from __future__ import annotations

import torch

from lwdsl.errors import fail
from lwdsl.solution import QuantFormat


def _per_layer(kv_heads: int | list[int], layers: int) -> list[int]:
    """One kv-head count a layer: head pruning can leave blocks with different counts."""
    heads = [kv_heads] * layers if isinstance(kv_heads, int) else list(kv_heads)
    if len(heads) != layers:
        raise ValueError(f"{len(heads)} kv-head counts for {layers} layers")
    return heads


def _lengths(windows: list[int | None] | None, layers: int, max_len: int) -> list[int]:
    """Positions each layer's cache holds: `max_len`, or a sliding-window layer's window (fewer)."""
    windows = windows or [None] * layers
    if len(windows) != layers:
        raise ValueError(f"{len(windows)} windows for {layers} layers")
    return [min(max_len, w) if w else max_len for w in windows]


def _ring_slots(start: int, end: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ring of `length` slots taking positions start..end-1: the slots of the `length - 1` positions
    before `start` that attention still reads (in order), and the new positions the ring keeps."""
    return torch.arange(max(0, start - length + 1), start) % length, torch.arange(max(start, end - length), end)


class FloatKVCache:
    """Keys and values kept as they come, in `dtype`.

    A layer with a sliding window (`windows[layer]`, Gemma 3's local layers) shorter than `max_len`
    keeps only its window: a ring, position p in slot p % window (what the fused step reads too), and
    `update` hands attention the window's positions in order."""

    def __init__(self, layers: int, batch: int, kv_heads: int | list[int], max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, windows: list[int | None] | None = None):
        lengths = _lengths(windows, layers, max_len)
        shapes = [(batch, heads, length, head_dim) for heads, length in zip(_per_layer(kv_heads, layers), lengths)]
        self.keys = [torch.zeros(shape, dtype=dtype) for shape in shapes]
        self.values = [torch.zeros(shape, dtype=dtype) for shape in shapes]
        self.max_len, self.lengths = max_len, lengths

    def update(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Store positions start.. and return the keys/values attention reads: positions 0..end-1, or
        for a ring the last `length - 1` before `start` and the new ones (the mask is the caller's)."""
        end, length = start + keys.shape[2], self.lengths[layer]
        if length == self.max_len:
            self.keys[layer][:, :, start:end] = keys
            self.values[layer][:, :, start:end] = values
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        earlier, kept = _ring_slots(start, end, length)
        out = []
        for stored, new in ((self.keys[layer], keys), (self.values[layer], values)):
            before = stored.index_select(2, earlier)
            stored[:, :, kept % length] = new[:, :, kept - start].to(stored.dtype)
            out.append(torch.cat((before.to(new.dtype), new), dim=2))
        return out[0], out[1]

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class Int8KVCache:
    """int8 codes with an fp16 scale per (batch, kv head, position); dequantised for attention.
    A sliding-window layer keeps its window as a ring, as `FloatKVCache` does."""

    def __init__(self, layers: int, batch: int, kv_heads: int | list[int], max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, windows: list[int | None] | None = None):
        lengths = _lengths(windows, layers, max_len)
        shapes = [(batch, heads, length, head_dim) for heads, length in zip(_per_layer(kv_heads, layers), lengths)]
        self.codes = [[torch.zeros(shape, dtype=torch.int8) for shape in shapes] for _ in range(2)]
        self.scales = [[torch.ones(shape[:3] + (1,), dtype=torch.float16) for shape in shapes]
                       for _ in range(2)]
        self.dtype, self.max_len, self.lengths = dtype, max_len, lengths

    def update(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Store positions start.. (rounded) and return what attention reads, as `FloatKVCache.update`."""
        end, length = start + keys.shape[2], self.lengths[layer]
        out = []
        for which, new in enumerate((keys, values)):
            scale = (new.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-7).to(torch.float16)
            codes = torch.round(new / scale.to(new.dtype)).clamp(-127, 127).to(torch.int8)
            stored_codes, stored_scales = self.codes[which][layer], self.scales[which][layer]
            if length == self.max_len:
                stored_codes[:, :, start:end] = codes
                stored_scales[:, :, start:end] = scale
                out.append(stored_codes[:, :, :end].to(self.dtype) * stored_scales[:, :, :end].to(self.dtype))
                continue
            earlier, kept = _ring_slots(start, end, length)
            before = stored_codes.index_select(2, earlier).to(self.dtype) * \
                stored_scales.index_select(2, earlier).to(self.dtype)
            stored_codes[:, :, kept % length] = codes[:, :, kept - start]
            stored_scales[:, :, kept % length] = scale[:, :, kept - start]
            out.append(torch.cat((before, codes.to(self.dtype) * scale.to(self.dtype)), dim=2))
        return out[0], out[1]

    def kv_cache_bytes(self) -> int:
        tensors = [t for group in self.codes + self.scales for t in group]
        return sum(t.numel() * t.element_size() for t in tensors)


class HalfKVCache(FloatKVCache):
    """Keys and values stored in fp16 or bf16, handed to attention in the dtype they came in."""

    stored_dtype = torch.float16

    def __init__(self, layers: int, batch: int, kv_heads: int | list[int], max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, windows: list[int | None] | None = None):
        super().__init__(layers, batch, kv_heads, max_len, head_dim, self.stored_dtype, windows)

    def update(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        stored_keys, stored_values = super().update(layer, start, keys, values)
        return stored_keys.to(keys.dtype), stored_values.to(values.dtype)


class BF16KVCache(HalfKVCache):
    stored_dtype = torch.bfloat16


KV_CACHES = {"fp32": FloatKVCache, "int8": Int8KVCache, "fp16": HalfKVCache, "bf16": BF16KVCache}


def kv_cache_for(fmt: QuantFormat | None, **shape) -> FloatKVCache | Int8KVCache:
    """The cache class for a KV format (`None` or fp32: float); E605 for one not implemented."""
    name = "fp32" if fmt is None else fmt.dtype
    cache_class = KV_CACHES.get(name)
    if cache_class is None:
        raise fail("E605", f"KV cache format {name} is not implemented",
                   hint=f"implemented: {', '.join(KV_CACHES)}")
    return cache_class(**shape)
