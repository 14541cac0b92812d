"""Training through the quantizer (straight-through estimator) for `recover distill` on quantized layers.

A packed `QuantizedLinear` has no float weight to train. For distillation it is swapped for a
`StraightThroughLinear`: a float32 master weight, started at the layer's dequantized weight (so the
student starts exactly where the compressed model is), whose forward computes with the fake-quantized
master, `q(w) = dequantize(quantize(w))`, written `w + (q(w) - w).detach()`: the forward sees the
quantized values, the gradient reaches `w` unchanged (the identity; Bengio et al. 2013, "Estimating or
Propagating Gradients Through Stochastic Neurons", and the QAT of Jacob et al. 2018). Small updates
that do not move a weight across a rounding boundary are kept in the master and add up over steps
until they do. After training, `requantized()` packs the trained master in the layer's own format:
the model keeps its size, its kernels and its artifact layout.

Measured on SmolLM2-135M with int4 everywhere (bench/bench_straight_through.py): see docs/BENCHMARKS.md.

    swapped = wrap_quantized(student)   # QuantizedLinear -> StraightThroughLinear, in place
    ... train ...
    unwrap_quantized(student)           # StraightThroughLinear -> QuantizedLinear (re-quantized)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lwdsl.apply.quantize import QuantizedLinear, dequantize_packed, quantize_weight


def fake_quantized(weight: torch.Tensor, fmt) -> torch.Tensor:
    """`dequantize(quantize(weight))` in `fmt`, with the identity as its gradient (straight-through)."""
    quantized = dequantize_packed(quantize_weight(weight.detach(), fmt)).to(weight.dtype)
    return weight + (quantized - weight).detach()


class StraightThroughLinear(nn.Module):
    """A quantized linear while it trains: a float master weight, fake-quantized in the forward."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        self.fmt, self.kernel = layer.fmt, layer.kernel
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.master = nn.Parameter(layer.dequantized_weight().detach().float().clone())
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantized(self.master, self.fmt).to(x.dtype), self.bias)

    def requantized(self) -> QuantizedLinear:
        """The trained master packed in the layer's format (the layer `apply` keeps)."""
        bias = None if self.bias is None else self.bias.detach()
        return QuantizedLinear(quantize_weight(self.master.detach(), self.fmt), self.out_features, self.fmt, bias,
                               self.kernel)


def _swap(model: nn.Module, kind: type, make) -> list[str]:
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(module))
            names.append(name)
    return names


def wrap_quantized(model: nn.Module) -> list[str]:
    """Every packed quantized linear of `model` (fp8 included) swapped for a straight-through one, in place."""
    return _swap(model, QuantizedLinear, StraightThroughLinear)


def unwrap_quantized(model: nn.Module) -> list[str]:
    """Every straight-through linear of `model` packed back into its format, in place."""
    return _swap(model, StraightThroughLinear, lambda layer: layer.requantized())
