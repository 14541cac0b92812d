"""Weight quantization: linear modules that hold real packed weights, and the `QuantFormat` handler.

- `QuantizedLinear`: int8 / int4 / nf4 / int2 codes or fp8 values, with fp16 scales per output
  channel or per group (and fp16 offsets when asymmetric), exactly the storage that
  `lwdsl.cost.formats.weight_bytes` counts. It computes with the kernels `kernels.DISPATCH` prefers for
  its family and phase, keeping one runtime form alive (the packed bytes, in the kernel's layout).
- `CastLinear`: fp16 / bf16 weights, nothing else.

Both rebuild from an artifact with `empty(...)` + `load_state_dict(...)`; the state dict holds the
stored form (`codes`, `scale`, `offset`, `bias`; `weight` for casts).

    model.model.layers[0].mlp.down_proj = QuantizedLinear.from_linear(linear, QuantFormat(dtype="int4", group=32))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lwdsl.apply import kernels
from lwdsl.apply.kernels import Packed
from lwdsl.apply.registry import ApplyContext, register
from lwdsl.cost.formats import format_applies
from lwdsl.errors import fail
from lwdsl.solution import QuantFormat

_BITS = {"int8": 8, "int4": 4, "int2": 2, "nf4": 4, "fp8": 8}
_CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # calibration search grid for the scale's range


def quantize_weight(weight: torch.Tensor, fmt: QuantFormat, clip: torch.Tensor | None = None) -> Packed:
    """The stored form of `weight` in `fmt`. `clip` (per output row, <= 1) shrinks the range first."""
    weight = weight.detach().float()
    if clip is not None:
        weight = _clipped(weight, fmt, clip)
    if fmt.dtype == "nf4":
        return kernels.quantize_nf4(weight, fmt.group)
    if fmt.dtype == "fp8":
        return _quantize_fp8(weight, fmt.group)
    return kernels.quantize_linear_codes(weight, _BITS[fmt.dtype], fmt.group, fmt.symmetric)


def _clipped(weight: torch.Tensor, fmt: QuantFormat, clip: torch.Tensor) -> torch.Tensor:
    """Clamp each row into `clip` times its range per group, so the scale covers the bulk better."""
    rows, cols = weight.shape
    size = fmt.group or cols
    blocks = weight.reshape(rows, cols // size, size)
    ratio = clip.reshape(rows, 1, 1)
    if fmt.symmetric or fmt.dtype == "nf4":
        bound = blocks.abs().amax(-1, keepdim=True) * ratio
        blocks = torch.maximum(torch.minimum(blocks, bound), -bound)
    else:
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        middle, half = (high + low) / 2, (high - low) / 2 * ratio
        blocks = torch.maximum(torch.minimum(blocks, middle + half), middle - half)
    return blocks.reshape(rows, cols)


def _quantize_fp8(weight: torch.Tensor, group: int | None) -> Packed:
    """fp8 e4m3 values with an fp16 scale per row or group mapping the block's absmax to 448."""
    rows, cols = weight.shape
    size = group or cols
    blocks = weight.reshape(rows, cols // size, size)
    scale = (blocks.abs().amax(-1) / 448.0).clamp(min=1e-10).to(kernels.SCALE_DTYPE)
    values = (blocks / scale.float()[..., None]).to(torch.float8_e4m3fn).reshape(rows, cols)
    scale = scale.squeeze(-1) if group is None else scale
    return Packed(values, scale.contiguous(), None, 8, group, "fp8", cols)


def calibrated_clip(weight: torch.Tensor, fmt: QuantFormat, inputs: torch.Tensor) -> torch.Tensor:
    """Per output row, the clip ratio from `CLIP_RATIOS` with the least output error on `inputs`."""
    inputs = inputs.reshape(-1, weight.shape[1]).float()
    reference = inputs @ weight.float().t()
    best_error = torch.full((weight.shape[0],), float("inf"))
    best_ratio = torch.ones(weight.shape[0])
    for ratio in CLIP_RATIOS:
        clip = torch.full((weight.shape[0],), ratio)
        approx = inputs @ dequantize_packed(quantize_weight(weight, fmt, clip)).t()
        error = (approx - reference).pow(2).sum(0)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, clip, best_ratio)
    return best_ratio


def dequantize_packed(packed: Packed) -> torch.Tensor:
    if packed.levels == "fp8":
        size = packed.group or packed.in_features
        rows = packed.codes.shape[0]
        blocks = packed.codes.float().reshape(rows, -1, size)
        return (blocks * packed.scale.float().reshape(rows, -1, 1)).reshape(rows, -1)
    return kernels.dequantize(packed)


class QuantizedLinear(nn.Module):
    """`y = x @ dequant(codes, scale, offset).T + bias`, computed by the measured fastest kernel."""

    def __init__(self, packed: Packed, out_features: int, fmt: QuantFormat, bias: torch.Tensor | None,
                 kernel: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = packed.in_features, out_features, fmt
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self._install(packed, kernel)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: QuantFormat, calibration: torch.Tensor | None = None,
                    kernel: str | None = None) -> "QuantizedLinear":
        """Quantize an `nn.Linear`; with `calibration` inputs, clip ranges to minimise output error."""
        weight = linear.weight.detach()
        clip = None if calibration is None else calibrated_clip(weight, fmt, calibration)
        return cls(quantize_weight(weight, fmt, clip), linear.out_features, fmt, linear.bias, kernel)

    @classmethod
    def empty(cls, in_features: int, out_features: int, fmt: QuantFormat, bias: bool = False,
              dtype: torch.dtype = torch.float32) -> "QuantizedLinear":
        """A placeholder of the right shapes, to be filled by `load_state_dict` from an artifact."""
        zero = torch.zeros(out_features, in_features, dtype=dtype)
        return cls(quantize_weight(zero, fmt), out_features, fmt,
                   torch.zeros(out_features) if bias else None)

    def _install(self, packed: Packed, kernel: str | None) -> None:
        self.family = "fp8" if packed.levels == "fp8" else kernels.family(packed)
        if self.family == "fp8":
            self.kernel, self.prefill_kernel = "dequant_fp32", "dequant_fp32"
            self._runtime, self._packed = packed, packed
            self._run = self._run_prefill = lambda x, p: F.linear(x, dequantize_packed(p).to(x.dtype))
            return
        table = kernels.CANDIDATES.get(self.family, {"dequant_fp32": kernels.CANDIDATES["int8"]["dequant_fp32"]})
        if kernel is None:
            kernel, (prepare, self._run) = kernels.kernel_for(self.family, "decode", packed.in_features)
        elif kernel in table:
            prepare, self._run = table[kernel]
        else:
            raise fail("E604", f"kernel {kernel!r} cannot run {self.fmt.label()}",
                       hint=f"kernels for it: {', '.join(table)}")
        self.kernel = self.prefill_kernel = kernel
        prefill_name, (prefill_prepare, prefill_run) = kernels.kernel_for(self.family, "prefill",
                                                                              packed.in_features)
        self._run_prefill = self._run
        if prefill_prepare is prepare and prefill_name != kernel:  # same runtime form: free to switch
            self.prefill_kernel, self._run_prefill = prefill_name, prefill_run
        self._runtime = prepare(packed)
        # Keep the stored codes only when the runtime form is not a permutation of them.
        self._packed = packed if self.kernel in kernels.KEEPS_STORED else Packed(
            None, packed.scale, packed.offset, packed.bits, packed.group, packed.levels, packed.in_features)

    # -- stored form ------------------------------------------------------------------------------
    def packed(self) -> Packed:
        """The stored form (codes re-derived from the kernel layout when only that is alive)."""
        if self._packed.codes is not None:
            return self._packed
        codes = kernels.stored_codes(self.kernel, self._runtime, self._packed,
                                     (self.out_features, self.in_features))
        p = self._packed
        return Packed(codes, p.scale, p.offset, p.bits, p.group, p.levels, p.in_features)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: codes + scales (+ offsets); equals the cost model's count."""
        packed = self._packed
        codes_bytes = self.out_features * -(-self.in_features * packed.bits // 8)
        extra = packed.scale.numel() * packed.scale.element_size()
        if packed.offset is not None:
            extra += packed.offset.numel() * packed.offset.element_size()
        return codes_bytes + extra

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_packed(self.packed())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        packed = self.packed()
        destination[prefix + "codes"] = packed.codes
        destination[prefix + "scale"] = packed.scale
        if packed.offset is not None:
            destination[prefix + "offset"] = packed.offset
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wanted = ["codes", "scale"] + (["offset"] if self._packed.offset is not None else []) + \
                 (["bias"] if self.bias is not None else [])
        missing = [prefix + key for key in wanted if prefix + key not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        current = self.packed()
        for key in ("codes", "scale", "offset"):
            old = getattr(current, key)
            if old is not None and (state_dict[prefix + key].shape != old.shape
                                    or state_dict[prefix + key].dtype != old.dtype):
                error_msgs.append(f"{prefix}{key}: stored {tuple(state_dict[prefix + key].shape)} "
                                  f"{state_dict[prefix + key].dtype}, expected {tuple(old.shape)} {old.dtype}")
                return
        packed = Packed(state_dict[prefix + "codes"], state_dict[prefix + "scale"],
                        state_dict.get(prefix + "offset"), current.bits, current.group, current.levels,
                        current.in_features)
        if self.bias is not None:
            self.bias.data.copy_(state_dict[prefix + "bias"])
        self._install(packed, self.kernel)

    # -- compute ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._run if x.numel() == x.shape[-1] else self._run_prefill  # one row: decode
        out = run(x, self._runtime)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        kernels_used = self.kernel if self.prefill_kernel == self.kernel else \
            f"{self.kernel} (decode), {self.prefill_kernel} (prefill)"
        return f"in={self.in_features}, out={self.out_features}, {self.fmt.label()}, kernel={kernels_used}"


class CastLinear(nn.Module):
    """fp16 / bf16 weights; computed in float32 from the cast weight (no native half matmul here)."""

    def __init__(self, weight: torch.Tensor, fmt: QuantFormat, bias: torch.Tensor | None):
        super().__init__()
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(_CAST_DTYPES[fmt.dtype]), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: QuantFormat, calibration=None, kernel=None) -> "CastLinear":
        return cls(linear.weight, fmt, linear.bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, fmt: QuantFormat, bias: bool = False,
              dtype: torch.dtype = torch.float32) -> "CastLinear":
        return cls(torch.zeros(out_features, in_features), fmt, torch.zeros(out_features) if bias else None)

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.fmt.dtype}"


# Which module class stores each dtype; fp32 means "leave the layer as it is".
MODULE_FOR_DTYPE = {"fp16": CastLinear, "bf16": CastLinear, "fp8": QuantizedLinear,
                    "int8": QuantizedLinear, "int4": QuantizedLinear, "nf4": QuantizedLinear,
                    "int2": QuantizedLinear}


def module_for(fmt: QuantFormat):
    """The class that stores `fmt` (for rebuilding an artifact with `.empty(...)`)."""
    return MODULE_FOR_DTYPE.get(fmt.dtype)


@register(QuantFormat)
def quantize_module(module: nn.Module, fmt: QuantFormat, ctx: ApplyContext) -> nn.Module:
    """The handler: an `nn.Linear` in, its quantized replacement out; fp32 leaves it unchanged."""
    if fmt.dtype == "fp32":
        return module
    if not isinstance(module, nn.Linear):
        raise fail("E602", f"{ctx.name or 'module'}: cannot store a {type(module).__name__} as "
                   f"{fmt.label()}", hint="weight formats apply to linear layers")
    reason = format_applies(tuple(module.weight.shape), fmt)
    if reason:
        raise fail("E603", f"{ctx.name or 'module'}: {fmt.label()} does not apply: {reason}")
    return MODULE_FOR_DTYPE[fmt.dtype].from_linear(module, fmt, ctx.calibration, ctx.options.get("kernel"))


def quantize_linears(model: nn.Module, fmt: QuantFormat, skip: tuple[str, ...] = (),
                     kernel: str | None = None) -> dict[str, str]:
    """Every `nn.Linear` of `model` (but `skip`) stored in `fmt` where the format applies.

    Returns, per linear, what it became or why it stayed (a benchmark / experiment helper; `apply`
    goes through the solution, where a layer the format cannot store is an error instead).
    """
    report = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name in skip:
            continue
        reason = format_applies(tuple(module.weight.shape), fmt)
        if reason:
            report[name] = f"stayed fp32: {reason}"
            continue
        parent_name, _, child = name.rpartition(".")
        options = {"kernel": kernel} if kernel else {}
        replacement = quantize_module(module, fmt, ApplyContext(name=name, options=options))
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        report[name] = f"{fmt.label()} ({getattr(replacement, 'kernel', 'cast')})"
    return report
