"""Exact references of the quantized paths' own numerics, for tests that must hold on every CPU.

A quantized path is compared with the computation it stands for, done in float64: the dequantized
weights (exact: fp16 scales and offsets times small integer codes) applied to the activations
rounded exactly as that path rounds them. What is left between the two is float32 summation error,
bounded by a few float32 ulps of the sum of the products' magnitudes, and, across a whole model,
an activation value that falls within float rounding of a rounding boundary in one path and not the
other: each such flip moves one activation by one code step, and across many blocks flips beget
flips. So a whole model's path is held to a bounded multiple of its format's own effect
(`FLIP_FRACTION`), and a single kernel to the float32 bound: never two approximations' argmax.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

FLOAT32_EPS = 2.0 ** -23
# A whole model's path against the float64 emulation of its own numerics: at most this multiple of the
# distance the format's activation rounding puts between the emulation and the same weights with
# unrounded activations. One flipped code (a value within float32 rounding of a rounding boundary)
# moves the next layer's inputs, which flips more codes there: over a deep model the path's rounding
# decisions become independent of the emulation's, and two independent roundings of the same size lie
# about sqrt(2) times one rounding's effect apart. Measured on SmolLM2 (30 blocks): 0.28-0.91 of it
# (int8, int4 g32 asym, int4 g64 sym; fused and torch steps). A wrong scale, offset, nibble order or
# block is of the order of the whole activation, many times the rounding's effect. The tight checks
# are per kernel (`test_kernels.py`: float32 summation bounds, no rounding flips).
FLIP_FRACTION = 2.0


def native_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 scales of `x` [..., K] per block of 32, exactly as `native.c` and
    `native_step.c` round them: scale = absmax / 127, codes = round-half-even(x * (1 / scale)), each
    step one IEEE float32 operation."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.round(blocks * inverse)
    return codes.reshape(x.shape), scale.squeeze(-1)


def native_activations(x: torch.Tensor) -> torch.Tensor:
    """`x` as the native integer kernels see it (codes times their block's scale), in float64."""
    codes, scale = native_codes(x)
    blocks = codes.double().reshape(*x.shape[:-1], -1, 32) * scale.double()[..., None]
    return blocks.reshape(x.shape)


def bf16_activations(x: torch.Tensor) -> torch.Tensor:
    return x.float().to(torch.bfloat16).double()


def float32_activations(x: torch.Tensor) -> torch.Tensor:
    return x.float().double()


def native_weight(packed) -> torch.Tensor:
    """The float32 weight the native dequantization writes: code * scale + offset rounded once (exact
    in float64: small integer codes times fp16 scales, plus an fp16 offset)."""
    from lwdsl.apply import kernels

    codes = kernels.signed_codes(packed).double()
    size = packed.group or codes.shape[1]
    blocks = codes.reshape(codes.shape[0], -1, size) * packed.scale.double().reshape(codes.shape[0], -1, 1)
    if packed.offset is not None:
        blocks = blocks + packed.offset.double().reshape(codes.shape[0], -1, 1)
    return blocks.reshape(codes.shape).float()


def magnitude_bound(x: torch.Tensor, weight_magnitude: torch.Tensor, operations: int) -> torch.Tensor:
    """The float32 summation bound of `operations` roundings over products of these magnitudes."""
    return operations * FLOAT32_EPS * (x.double().abs() @ weight_magnitude.double().t())


class Emulated(nn.Module):
    """A float64 linear: the dequantized weight, activations rounded as `activations` does (by the
    number of rows, as the executor picks decode and prefill kernels)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, decode, prefill, prefill_rows: int):
        super().__init__()
        self.register_buffer("weight", weight.double())
        self.register_buffer("bias", None if bias is None else bias.double())
        self.decode, self.prefill, self.prefill_rows = decode, prefill, prefill_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        rounded = (self.prefill if rows >= self.prefill_rows else self.decode)(x)
        out = rounded.double() @ self.weight.t()
        return out if self.bias is None else out + self.bias


def emulation(model: nn.Module, decode=native_activations, prefill=float32_activations,
              prefill_rows: int | None = None) -> nn.Module:
    """A float64 copy of `model` whose quantized linears compute with their dequantized weights on
    activations rounded as the native kernels round them (`decode` below `prefill_rows` rows,
    `prefill` from there on); float linears stay float (in float64)."""
    from lwdsl.apply import native
    from lwdsl.apply.quantize import QuantizedLinear

    rows = native.DEQUANT_ROWS if prefill_rows is None else prefill_rows
    copied = copy.deepcopy(model)
    for name, module in list(copied.named_modules()):
        if isinstance(module, QuantizedLinear):
            parent, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent) if parent else copied, child,
                    Emulated(module.dequantized_weight(), module.bias, decode, prefill, rows))
    return copied.double()


def last_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits[0, -1].double()


def assert_near_own_numerics(path: torch.Tensor, own: torch.Tensor, unrounded: torch.Tensor,
                             fraction: float = FLIP_FRACTION) -> None:
    """`path` (a quantized path's logits) is within `fraction` times the format's activation-rounding
    effect (`own` - `unrounded`, both float64 emulations) from `own`."""
    effect = (own - unrounded).norm().item()
    distance = (path.double() - own).norm().item()
    assert effect > 0, "the emulation rounds nothing: the comparison would be empty"
    assert distance <= fraction * effect, (distance, effect, distance / effect)


def assert_greedy_within_ties(tokens: list[int], prompt: torch.Tensor, reference: nn.Module,
                              own: nn.Module | None = None, margin: float = 0.0) -> None:
    """Each greedy token of a path is the reference's choice, or a near tie at that position
    (teacher-forced on the path's own tokens): its reference logit is within the margin of the top
    one. The margin is `margin` plus, where `own` (the float64 emulation of what the path computes)
    is given, three times the largest logit difference between `own` and `reference` there: a token
    can only overtake the reference's choice by half the gap the two computations put between them,
    and the path is within a fraction of that of its own emulation."""
    ids = torch.cat([prompt, torch.tensor([tokens[:-1]], dtype=prompt.dtype)], dim=1)
    start = prompt.shape[1] - 1
    with torch.inference_mode():
        logits = reference(ids).logits[0, start:].double()
        own_logits = None if own is None else own(ids).logits[0, start:].double()
    for position, token in enumerate(tokens):
        row = logits[position]
        allowed = margin + (0.0 if own_logits is None else 3 * (own_logits[position] - row).abs().max().item())
        gap = (row.max() - row[token]).item()
        assert gap <= allowed, (position, token, int(row.argmax()), gap, allowed)
