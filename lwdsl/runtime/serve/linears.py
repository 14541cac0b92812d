"""The serving executor's linear layers: each stored format on the kernel that computes it on the device.

`serve_linear(module, device)` turns one loaded layer (an `nn.Linear`, a `CastLinear`, a
`QuantizedLinear`, a 2:4 `Sparse24Linear`, or a tensor-parallel `RowParallel` around any of them) into
a module that computes the same stored weight with the kernel `KERNELS` names first for it on that
device type. The table is data: a kernel says which devices and which layers it takes, and how it is
built; the first that takes the layer wins, the last (`dequant`) takes everything. The codes are
converted to the kernel's layout at load, never re-rounded:

- float (`nn.Linear`, `CastLinear`): the stored dtype's own matmul (cuBLAS on CUDA), no copy.
- int8 per channel: on CUDA `torch._weight_int8pack_mm` (int8 codes, per-row scale, float32) for
  decode rows; a prefill chunk, and every row on a CPU (whose int8pack kernel rounds activations to
  bf16 on some CPUs), multiplies by the codes widened to the activation dtype (|code| <= 127 is exact
  in bf16/fp16) and applies the scale after.
- int4 in groups of 32/64/128/256: tinygemm, `torch._weight_int4pack_mm` on CUDA
  (`_weight_int4pack_mm_for_cpu` on a CPU, same `scales_and_zeros`). The codes are exact; the kernel
  reads w = (q - 8) * scale + zero with scale and zero in bf16, so lwdsl's fp16 scale (and offset,
  folded into zero = offset + 8 * scale) are rounded to bf16: at most 2^-9 of each group's scale, a
  deviation from the stored format that `DEVIATIONS` names.
- fp8 per row on sm90+: `torch._scaled_mm` with the stored e4m3 values and per-row scales, the
  activations scaled per row to e4m3 (W8A8, as vLLM's fp8 path).
- everything else (nf4, int2, grouped fp8, int4 groups tinygemm lacks, 2:4): dequantized once at load
  to the activation dtype, then the dtype's matmul (`dequant`).

    layer = serve_linear(model.model.layers[0].mlp.down_proj, torch.device("cuda"), torch.bfloat16)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lwdsl.apply.kernels import unpack_bits

# Rows up to this many are decode rows (one token of each sequence of a batch); more is a prefill chunk.
DECODE_ROWS = 64
TINYGEMM_GROUPS = frozenset({32, 64, 128, 256})
DEVIATIONS = {
    "int4_tinygemm": "int4 scale and zero point rounded from fp16 to bf16 (tinygemm reads bf16)",
    "fp8_scaled_mm": "activations rounded to e4m3 per row (W8A8)",
}


class ServeLinear(nn.Module):
    """Base of the executor's layers: `kernel` names what computes it, `bias` is added in float32."""

    kernel = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def _finish(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.bias is not None:
            out = out.float() + self.bias
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class FloatLinear(ServeLinear):
    """A float weight in its stored dtype: x is cast to it, the result back to x's dtype."""

    kernel = "float"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(F.linear(x.to(self.weight.dtype), self.weight), x.dtype)


class Int8Linear(ServeLinear):
    """int8 codes [out, in] with a float32 scale per row (the stored fp16 scale, widened exactly)."""

    kernel = "int8pack"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(codes.shape[1], codes.shape[0], bias)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.pack_rows = DECODE_ROWS if codes.device.type == "cuda" else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= self.pack_rows:
            out = torch._weight_int8pack_mm(flat.float(), self.codes, self.scale)
        else:
            out = F.linear(flat, self.codes.to(flat.dtype)).float() * self.scale
        return self._finish(out, x.dtype).reshape(*x.shape[:-1], -1)


class Int4Linear(ServeLinear):
    """tinygemm's packed int4 with bf16 `scales_and_zeros` [in/group, out, 2]."""

    kernel = "int4_tinygemm"

    def __init__(self, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor, in_features: int,
                 out_features: int, bias: torch.Tensor | None, matmul: Callable):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.group, self._matmul = group, matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = self._matmul(flat, self.packed, self.group, self.scales_and_zeros)
        return self._finish(out, x.dtype).reshape(*x.shape[:-1], -1)


class Fp8Linear(ServeLinear):
    """e4m3 values [out, in] with a float32 scale per row, through `torch._scaled_mm` (rowwise)."""

    kernel = "fp8_scaled_mm"

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(values.shape[1], values.shape[0], bias)
        self.register_buffer("values", values.contiguous())
        self.register_buffer("scale", scale.float().reshape(1, -1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        row_scale = (flat.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12)
        quantized = (flat / row_scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(quantized, self.values.t(), scale_a=row_scale, scale_b=self.scale,
                               out_dtype=torch.bfloat16)
        return self._finish(out, x.dtype).reshape(*x.shape[:-1], -1)


class ParallelLinear(nn.Module):
    """A row-parallel layer's local part on its kernel; partial sums all-reduced, the bias added once."""

    def __init__(self, local: nn.Module, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.local, self.group = local, group
        self.kernel = getattr(local, "kernel", "")
        self.in_features, self.out_features = local.in_features, local.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        from lwdsl.apply.shard import world

        out = self.local(x)
        if world() > 1:
            dist.all_reduce(out, group=self.group)
        return out if self.bias is None else (out.float() + self.bias).to(out.dtype)


# --- which layer each kernel takes ------------------------------------------------------------------

def _packed(module: nn.Module):
    from lwdsl.apply.quantize import QuantizedLinear

    return module.packed() if isinstance(module, QuantizedLinear) else None


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def _is_float(module: nn.Module) -> bool:
    from lwdsl.apply.quantize import CastLinear

    return type(module) is nn.Linear or isinstance(module, CastLinear)


def _is_int8(module: nn.Module) -> bool:
    packed = _packed(module)
    return packed is not None and packed.levels == "linear" and packed.bits == 8 and packed.group is None \
        and packed.offset is None


def _is_int4(module: nn.Module) -> bool:
    packed = _packed(module)
    return packed is not None and packed.levels == "linear" and packed.bits == 4 \
        and packed.group in TINYGEMM_GROUPS and packed.in_features % 32 == 0 \
        and module.out_features % 8 == 0


def _is_rowwise_fp8(module: nn.Module) -> bool:
    packed = _packed(module)
    return packed is not None and packed.levels == "fp8" and packed.group is None \
        and packed.in_features % 16 == 0 and module.out_features % 16 == 0


def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _tinygemm_runs(device: torch.device) -> bool:
    """tinygemm's CUDA kernel needs bf16 tensor cores (sm80+); its CPU twin runs anywhere."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def _build_float(module: nn.Module, device: torch.device, dtype: torch.dtype) -> ServeLinear:
    return FloatLinear(module.weight.detach().to(device), _bias(module))


def _build_int8(module: nn.Module, device: torch.device, dtype: torch.dtype) -> ServeLinear:
    packed = module.packed()
    return Int8Linear(packed.codes.to(device), packed.scale.to(device), _bias(module))


def tinygemm_scales_and_zeros(scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """lwdsl's int4 groups as tinygemm reads them: w = (q - 8) * scale + zero, [groups, out, 2] bf16.

    Stored symmetric codes are the signed value + 8 (zero = 0); asymmetric codes are q with
    w = q * scale + offset = (q - 8) * scale + (offset + 8 * scale). Computed in float32, rounded once."""
    scale32 = scale.float()
    zero = torch.zeros_like(scale32) if offset is None else offset.float() + 8 * scale32
    return torch.stack([scale32.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)


def _inner_k_tiles(in_features: int) -> int:
    return next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)


def _build_int4(module: nn.Module, device: torch.device, dtype: torch.dtype) -> ServeLinear:
    packed = module.packed()
    codes = unpack_bits(packed.codes, 4)  # [out, in], values 0..15, exactly the stored codes
    scales_and_zeros = tinygemm_scales_and_zeros(packed.scale, packed.offset).to(device)
    if device.type == "cuda":  # CUDA's layout input: [out, in/2] bytes, even column in the high nibble
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(device)
        weight = torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(packed.in_features))
        matmul = torch.ops.aten._weight_int4pack_mm
    else:
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        matmul = torch.ops.aten._weight_int4pack_mm_for_cpu
    return Int4Linear(weight, packed.group, scales_and_zeros, packed.in_features, module.out_features,
                      _bias(module), matmul)


def _build_fp8(module: nn.Module, device: torch.device, dtype: torch.dtype) -> ServeLinear:
    packed = module.packed()
    return Fp8Linear(packed.codes.to(device), packed.scale.to(device), _bias(module))


def _dense_weight(module: nn.Module) -> torch.Tensor:
    for method in ("dequantized_weight", "dense_weight"):
        if hasattr(module, method):
            return getattr(module, method)()
    return module.weight


def _build_dequant(module: nn.Module, device: torch.device, dtype: torch.dtype) -> ServeLinear:
    layer = FloatLinear(_dense_weight(module).detach().to(dtype).to(device), _bias(module))
    layer.kernel = "dequant"
    return layer


@dataclass(frozen=True)
class Kernel:
    """One way to compute a layer: on which device types, which layers it takes, how it is built."""

    name: str
    devices: frozenset[str]
    takes: Callable[[nn.Module, torch.device], bool]
    build: Callable[[nn.Module, torch.device, torch.dtype], ServeLinear]


# In order of preference; the first kernel that runs on the device and takes the layer is used.
KERNELS: tuple[Kernel, ...] = (
    Kernel("float", frozenset({"cuda", "cpu"}), lambda m, d: _is_float(m), _build_float),
    Kernel("int8pack", frozenset({"cuda", "cpu"}), lambda m, d: _is_int8(m), _build_int8),
    Kernel("int4_tinygemm", frozenset({"cuda", "cpu"}), lambda m, d: _is_int4(m) and _tinygemm_runs(d),
           _build_int4),
    Kernel("fp8_scaled_mm", frozenset({"cuda"}), lambda m, d: _is_rowwise_fp8(m) and _sm90(d), _build_fp8),
    Kernel("dequant", frozenset({"cuda", "cpu"}), lambda m, d: True, _build_dequant),
)


def kernel_for(module: nn.Module, device: torch.device) -> Kernel:
    """The kernel `serve_linear` uses for `module` on `device`."""
    return next(k for k in KERNELS if device.type in k.devices and k.takes(module, device))


def serve_linear(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module` on its kernel (a layer already converted is returned as it is)."""
    from lwdsl.apply.shard import RowParallel

    if isinstance(module, (ServeLinear, ParallelLinear)):
        return module
    if isinstance(module, RowParallel):
        return ParallelLinear(serve_linear(module.local, device, dtype), _bias(module), module.group)
    return kernel_for(module, device).build(module, device, dtype)
