"""The fused decode step: a Llama-layout (or Gemma 3) model's whole batch-1 step in one native call.

`describe(model, cache, ...)` reads the live modules (fp32 `nn.Linear`, and `QuantizedLinear` holding
int8 per-channel or int4 grouped codes in their stored layout) into `native.LwModel`, pointing at the
modules' own tensors and at the float KV cache: nothing is copied, so resident memory is unchanged.
It returns the reason instead when a model is outside what the step computes (another format, an
offload, shard or pipeline hook, an int8 KV cache, no compiled library); the torch forward then runs as before.

    plan = describe(model, cache, {None: (cos, sin)}, [None] * blocks, max_len, head_dim)
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
    softcap: float | None = None  # Gemma's final logit soft-capping, where a config sets one

    def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        state = hidden.reshape(-1).float().contiguous().clone()
        logits = torch.empty(self.vocab)
        native.llama_step(self.model, state, position, logits)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
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


def _norm_weight(norm: nn.Module | None, plus_one: bool = False, keep: list | None = None) -> torch.Tensor | None:
    """The weight the step scales a norm by: the module's own, or Gemma's (1 + w) as a new tensor."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dtype != torch.float32 or not _plain(weight) or norm._forward_hooks \
            or norm._forward_pre_hooks:
        return None
    if plus_one:
        weight = (1.0 + weight.detach()).contiguous()
        keep.append(weight)
    return weight


GEMMA = "gemma3_text"
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


def _block_norms(layer, gemma: bool, keep: list) -> dict | str:
    """A block's norm weights as the step reads them (`LwBlock`), or why not."""
    if not gemma:
        named = {"input_norm": layer.input_layernorm, "post_norm": layer.post_attention_layernorm}
    else:
        attn = layer.self_attn
        named = {"input_norm": layer.input_layernorm, "post_norm": layer.pre_feedforward_layernorm,
                 "attn_out_norm": layer.post_attention_layernorm,
                 "mlp_out_norm": layer.post_feedforward_layernorm, "q_norm": attn.q_norm, "k_norm": attn.k_norm}
    weights = {name: _norm_weight(norm, gemma, keep) for name, norm in named.items()}
    missing = [name for name, weight in weights.items() if weight is None]
    return f"a norm without a plain float32 weight ({missing[0]})" if missing else \
        {name: _pointer(weight, keep) for name, weight in weights.items()}


def describe(model, cache, tables: dict, kinds: list, max_len: int, head_dim: int,
             threads: int | None = None) -> Fused | str:
    """The fused step over `model`'s modules and `cache` (`tables`: kind -> rotary (cos, sin)
    [max_len, head_dim]; `kinds`: each block's kind), or why it cannot run this model."""
    if not native.available():
        return "the native library is not built"
    if not isinstance(cache, FloatKVCache) or cache.keys[0].dtype != torch.float32 or cache.keys[0].shape[0] != 1:
        return "the KV cache is not a batch-1 float32 cache"
    config = model.config
    gemma = getattr(config, "model_type", "") == GEMMA
    if not gemma and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and config.sliding_window < max_len:
        return "sliding-window attention"
    inner, keep = model.model, []
    norms = [getattr(layer, name) for layer in inner.layers for name in
             (_GEMMA_NORMS if gemma else ("input_layernorm", "post_attention_layernorm"))]
    if gemma:
        norms += [n for layer in inner.layers for n in (layer.self_attn.q_norm, layer.self_attn.k_norm)]
    eps = {getattr(n, "variance_epsilon", None) or getattr(n, "eps", None) for n in norms}
    if len(eps) != 1 or None in eps:
        return "norms with different epsilons"
    if gemma and getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    activation = getattr(config, "hidden_activation", None) if gemma else getattr(config, "hidden_act", "silu")
    if activation not in ("silu", "gelu_pytorch_tanh"):
        return f"an MLP activation ({activation}) other than SiLU and GELU (tanh)"
    for name, module in [("the model", model), ("the decoder", inner)] + [
            (f"layers.{i}", layer) for i, layer in enumerate(inner.layers)]:
        if module._forward_hooks or module._forward_pre_hooks:  # a pipeline's moves between devices
            return f"{name} has hooks (offload, sharding or pipeline placement)"
    blocks = (native.LwBlock * len(inner.layers))()
    widest_rows, widest_features = 0, 0
    for index, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        linears = {}
        for name, module in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                             ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
            described = _linear(module, f"layers.{index}.{name}", keep)
            if isinstance(described, str):
                return described
            linears[name] = described
            widest_rows = max(widest_rows, described.N)
            widest_features = max(widest_features, described.K)
        norm_pointers = _block_norms(layer, gemma, keep)
        if isinstance(norm_pointers, str):
            return f"layers.{index}: {norm_pointers}"
        heads, kv_heads = linears["q"].N // head_dim, linears["k"].N // head_dim
        if kv_heads == 0 or heads % kv_heads or cache.keys[index].shape[1] != kv_heads:
            return f"layers.{index}: {heads} query heads over {kv_heads} kv heads"
        cos, sin = (t.float().contiguous() for t in tables[kinds[index]])
        blocks[index] = native.LwBlock(**linears, **norm_pointers, keys=_pointer(cache.keys[index], keep),
                                       values=_pointer(cache.values[index], keep), heads=heads,
                                       kv_heads=kv_heads, cos=_pointer(cos, keep), sin=_pointer(sin, keep),
                                       cache_len=cache.keys[index].shape[2])
    head = _linear(model.lm_head, "lm_head", keep)
    if isinstance(head, str):
        return head
    final = _norm_weight(inner.norm, gemma, keep)
    if final is None:
        return "the final norm has no plain float32 weight"
    scale = getattr(inner.layers[0].self_attn, "scaling", head_dim ** -0.5)
    cos, sin = (t.float().contiguous() for t in tables[kinds[0]])
    described = native.LwModel(
        blocks=len(inner.layers), hidden=config.hidden_size, head_dim=head_dim, max_len=max_len,
        threads=threads or torch.get_num_threads(), eps=float(eps.pop()), attention_scale=float(scale),
        cos=_pointer(cos, keep), sin=_pointer(sin, keep), final_norm=_pointer(final, keep), head=head,
        block=ctypes.cast(blocks, ctypes.POINTER(native.LwBlock)), max_rows=widest_rows,
        max_features=max(widest_features, head.K, config.hidden_size),
        activation=int(activation == "gelu_pytorch_tanh"))
    keep.append(blocks)
    return Fused(described, keep, head.N, getattr(config, "final_logit_softcapping", None) if gemma else None)
