"""The fused decode step: a Llama-layout model's whole batch-1 step in one native call.

`describe(model, cache, ...)` reads the live modules (fp32 `nn.Linear`, and `QuantizedLinear` holding
int8 per-channel or int4 grouped codes in their stored layout) into `native.LwModel`, pointing at the
modules' own tensors and at the float KV cache: nothing is copied, so resident memory is unchanged.
It returns the reason instead when a model is outside what the step computes (another format, an
offload, shard or pipeline hook, an int8 KV cache, no compiled library); the torch forward then runs as before.

    plan = describe(model, cache, cos, sin, max_len)
    if isinstance(plan, Fused): logits = plan.step(hidden, position)
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from lwdsl.apply import native
from lwdsl.apply.kv import FloatKVCache


@dataclass
class Fused:
    """A described model: the C struct and the tensors it points at (kept alive here)."""

    model: native.LwModel
    keep: list
    vocab: int

    def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        state = hidden.reshape(-1).float().contiguous().clone()
        logits = torch.empty(self.vocab)
        native.llama_step(self.model, state, position, logits)
        return logits[None]


def _pointer(tensor: torch.Tensor | None, keep: list) -> int | None:
    if tensor is None:
        return None
    keep.append(tensor)
    return tensor.data_ptr()


def _plain(tensor: torch.Tensor | None) -> bool:
    """A dense CPU tensor whose memory is the values (not a subclass: DTensor shards, torchao's
    quantized tensors, which only look like float tensors)."""
    if tensor is None:
        return True
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    return type(data) is torch.Tensor and data.device.type == "cpu" and data.is_contiguous()


def _linear(module: nn.Module, name: str, keep: list) -> native.LwLinear | str:
    from lwdsl.apply.quantize import QuantizedLinear

    if module._forward_hooks or module._forward_pre_hooks:
        return f"{name} has hooks (offload, sharding or pipeline placement)"
    bias = getattr(module, "bias", None)
    if bias is not None and (bias.dtype != torch.float32 or not _plain(bias)):
        return f"{name}: bias is not a plain float32 tensor"
    if type(module) is nn.Linear:
        weight = module.weight
        if weight.dtype != torch.float32 or not _plain(weight):
            return f"{name}: weight is not a plain float32 tensor"
        return native.LwLinear(0, module.out_features, module.in_features, 0, _pointer(weight, keep), None,
                               None, _pointer(bias, keep))
    if isinstance(module, QuantizedLinear):
        packed = module._packed
        if packed.codes is None or not _plain(packed.codes):
            return f"{name}: kernel {module.kernel} does not keep the stored codes"
        if module.in_features % 32:
            return f"{name}: {module.in_features} inputs, not a multiple of the step's blocks of 32"
        if module.family == "int8":
            return native.LwLinear(1, module.out_features, module.in_features, 0, _pointer(packed.codes, keep),
                                   _pointer(packed.scale, keep), None, _pointer(bias, keep))
        if module.family == "int8g":
            return native.LwLinear(3, module.out_features, module.in_features, packed.group,
                                   _pointer(packed.codes, keep), _pointer(packed.scale, keep), None,
                                   _pointer(bias, keep))
        if module.family == "int4" and packed.group % 32 == 0:
            return native.LwLinear(2, module.out_features, module.in_features, packed.group,
                                   _pointer(packed.codes, keep), _pointer(packed.scale, keep),
                                   _pointer(packed.offset, keep), _pointer(bias, keep))
        return f"{name}: {module.fmt.label()} has no fused kernel"
    return f"{name}: {type(module).__name__} has no fused kernel"


def _norm_weight(norm: nn.Module) -> torch.Tensor | None:
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dtype != torch.float32 or not _plain(weight) or norm._forward_hooks \
            or norm._forward_pre_hooks:
        return None
    return weight


def describe(model, cache, cos: torch.Tensor, sin: torch.Tensor, max_len: int, head_dim: int,
             threads: int | None = None) -> Fused | str:
    """The fused step over `model`'s modules and `cache`, or why it cannot run this model."""
    if not native.available():
        return "the native library is not built"
    if not isinstance(cache, FloatKVCache) or cache.keys[0].dtype != torch.float32 or cache.keys[0].shape[0] != 1:
        return "the KV cache is not a batch-1 float32 cache"
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and config.sliding_window < max_len:
        return "sliding-window attention"
    inner, keep = model.model, []
    eps = {getattr(n, "variance_epsilon", None) or getattr(n, "eps", None)
           for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)}
    if len(eps) != 1 or None in eps:
        return "norms with different epsilons"
    for name, module in [("the model", model), ("the decoder", inner)] + [
            (f"layers.{i}", layer) for i, layer in enumerate(inner.layers)]:
        if module._forward_hooks or module._forward_pre_hooks:  # a pipeline's moves between devices
            return f"{name} has hooks (offload, sharding or pipeline placement)"
    blocks = (native.LwBlock * len(inner.layers))()
    widest_rows, widest_features = 0, 0
    for index, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation") and \
                getattr(config, "hidden_act", "silu") != "silu":
            return "an MLP activation other than SiLU"
        linears = {}
        for name, module in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                             ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
            described = _linear(module, f"layers.{index}.{name}", keep)
            if isinstance(described, str):
                return described
            linears[name] = described
            widest_rows = max(widest_rows, described.N)
            widest_features = max(widest_features, described.K)
        norms = _norm_weight(layer.input_layernorm), _norm_weight(layer.post_attention_layernorm)
        if None in norms:
            return f"layers.{index}: a norm without a plain float32 weight"
        heads, kv_heads = linears["q"].N // head_dim, linears["k"].N // head_dim
        if kv_heads == 0 or heads % kv_heads or cache.keys[index].shape[1] != kv_heads:
            return f"layers.{index}: {heads} query heads over {kv_heads} kv heads"
        blocks[index] = native.LwBlock(**linears, input_norm=_pointer(norms[0], keep),
                                       post_norm=_pointer(norms[1], keep),
                                       keys=_pointer(cache.keys[index], keep),
                                       values=_pointer(cache.values[index], keep), heads=heads,
                                       kv_heads=kv_heads)
    head = _linear(model.lm_head, "lm_head", keep)
    if isinstance(head, str):
        return head
    final = _norm_weight(inner.norm)
    if final is None:
        return "the final norm has no plain float32 weight"
    scale = getattr(inner.layers[0].self_attn, "scaling", head_dim ** -0.5)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    described = native.LwModel(
        blocks=len(inner.layers), hidden=config.hidden_size, head_dim=head_dim, max_len=max_len,
        threads=threads or torch.get_num_threads(), eps=float(eps.pop()), attention_scale=float(scale),
        cos=_pointer(cos, keep), sin=_pointer(sin, keep), final_norm=_pointer(final, keep), head=head,
        block=ctypes.cast(blocks, ctypes.POINTER(native.LwBlock)), max_rows=widest_rows,
        max_features=max(widest_features, head.K, config.hidden_size))
    keep.append(blocks)
    return Fused(described, keep, head.N)
