"""The serving executor's static KV cache: preallocated for batch x positions, written in place at
position tensors (so a decode step captured in a CUDA graph writes where the replayed position says).

`StaticKV` keeps keys and values in the plan's float KV format (fp32, fp16, bf16); `StaticInt8KV`
keeps int8 codes with one fp16 absmax scale per (sequence, kv head, position), exactly as
`lwdsl.apply.kv.Int8KVCache` rounds them, and dequantizes the whole cache to the activation dtype
when a step reads it. Attention runs in `attention_dtype`: a float cache's own dtype (queries are cast
to it, the cache is read as it is), the activation dtype for int8.

    cache = static_cache(QuantFormat(dtype="bf16"), layers=30, batch=1, kv_heads=[3] * 30, positions=768,
                         head_dim=64, device=torch.device("cuda"), activation=torch.bfloat16)
"""
from __future__ import annotations

import torch

from lwdsl.errors import fail
from lwdsl.solution import QuantFormat

FLOAT_KV = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class StaticKV:
    """Keys and values `[batch, kv_heads, positions, head_dim]` a layer, in one float dtype."""

    def __init__(self, layers: int, batch: int, kv_heads: list[int], positions: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, activation: torch.dtype):
        self.keys = [torch.zeros(batch, heads, positions, head_dim, dtype=dtype, device=device)
                     for heads in kv_heads]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.positions, self.activation = positions, activation
        self.attention_dtype = dtype  # attention runs in the cache's dtype: the cache is never copied

    def write(self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[layer].index_copy_(2, positions, keys.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(2, positions, values.to(self.values[layer].dtype))

    def read(self, layer: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, end) (all when `end` is None), in `attention_dtype`."""
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class StaticInt8KV:
    """int8 codes with an fp16 scale per (sequence, kv head, position)."""

    def __init__(self, layers: int, batch: int, kv_heads: list[int], positions: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, activation: torch.dtype):
        shapes = [(batch, heads, positions, head_dim) for heads in kv_heads]
        self.codes = [[torch.zeros(s, dtype=torch.int8, device=device) for s in shapes] for _ in range(2)]
        self.scales = [[torch.ones(s[:3] + (1,), dtype=torch.float16, device=device) for s in shapes]
                       for _ in range(2)]
        self.positions, self.activation = positions, activation
        self.attention_dtype = activation

    def write(self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        for which, new in enumerate((keys, values)):
            new = new.float()
            scale = (new.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-7).to(torch.float16)
            codes = torch.round(new / scale.float()).clamp(-127, 127).to(torch.int8)
            self.codes[which][layer].index_copy_(2, positions, codes)
            self.scales[which][layer].index_copy_(2, positions, scale)

    def read(self, layer: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for which in range(2):
            codes, scale = self.codes[which][layer][:, :, :end], self.scales[which][layer][:, :, :end]
            out.append((codes.float() * scale.float()).to(self.activation))
        return out[0], out[1]

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for group in self.codes + self.scales for t in group)


def static_cache(fmt: QuantFormat | None, *, layers: int, batch: int, kv_heads: list[int], positions: int,
                 head_dim: int, device: torch.device, activation: torch.dtype) -> StaticKV | StaticInt8KV:
    """The static cache for a KV format (None: the activation dtype); E605 for one not implemented."""
    name = None if fmt is None else fmt.dtype
    shape = dict(layers=layers, batch=batch, kv_heads=kv_heads, positions=positions, head_dim=head_dim,
                 device=device, activation=activation)
    if name is None:
        return StaticKV(dtype=activation, **shape)
    if name in FLOAT_KV:
        return StaticKV(dtype=FLOAT_KV[name], **shape)
    if name == "int8":
        return StaticInt8KV(dtype=torch.int8, **shape)
    raise fail("E605", f"KV cache format {name} is not implemented by the serving executor",
               hint=f"implemented: {', '.join([*FLOAT_KV, 'int8'])}")
