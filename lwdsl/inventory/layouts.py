"""Architecture numbers -> the HF implementation's weights and module names.

One function per module layout, registered by `model_type`. The Llama layout covers the
Llama/Mistral/Qwen2 family (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`); the GPT-2
layout has a fused `c_attn`, Conv1D weights stored (in, out), learned position embeddings and biases
(`GPT2LMHeadModel`).
"""
from __future__ import annotations

from typing import Callable

from lwdsl.inventory.records import ArchNumbers, Role, Weight

Layout = Callable[[ArchNumbers], tuple[list[Weight], list[str]]]


def _param(weights: list[Weight], module: str, shape: tuple[int, ...], role: Role,
           block: int | None, bias: int | None = None, transposed: bool = False) -> None:
    weights.append(Weight(name=f"{module}.weight", module=module, shape=shape, role=role,
                          block=block, transposed=transposed))
    if bias:
        weights.append(Weight(name=f"{module}.bias", module=module, shape=(bias,), role=role,
                              block=block, is_bias=True))


def llama_layout(arch: ArchNumbers) -> tuple[list[Weight], list[str]]:
    """transformers' LlamaForCausalLM (and Mistral, Qwen2): RMSNorm, RoPE, SwiGLU MLP."""
    h, q_out, kv_out, inter = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    weights: list[Weight] = []
    modules = ["model", "model.embed_tokens", "model.layers"]
    _param(weights, "model.embed_tokens", (arch.vocab, h), "embedding", None)
    for i in range(arch.layers):
        p = f"model.layers.{i}"
        attn_bias = lambda n: n if arch.attention_bias else None  # noqa: E731
        _param(weights, f"{p}.self_attn.q_proj", (q_out, h), "attn_q", i, attn_bias(q_out))
        _param(weights, f"{p}.self_attn.k_proj", (kv_out, h), "attn_k", i, attn_bias(kv_out))
        _param(weights, f"{p}.self_attn.v_proj", (kv_out, h), "attn_v", i, attn_bias(kv_out))
        _param(weights, f"{p}.self_attn.o_proj", (h, q_out), "attn_o", i, h if arch.attention_out_bias else None)
        mlp_bias = lambda n: n if arch.mlp_bias else None  # noqa: E731
        _param(weights, f"{p}.mlp.gate_proj", (inter, h), "mlp_gate", i, mlp_bias(inter))
        _param(weights, f"{p}.mlp.up_proj", (inter, h), "mlp_up", i, mlp_bias(inter))
        _param(weights, f"{p}.mlp.down_proj", (h, inter), "mlp_down", i, mlp_bias(h))
        _param(weights, f"{p}.input_layernorm", (h,), "norm", i)
        _param(weights, f"{p}.post_attention_layernorm", (h,), "norm", i)
        modules += [p, f"{p}.self_attn", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                    f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj", f"{p}.mlp", f"{p}.mlp.gate_proj",
                    f"{p}.mlp.up_proj", f"{p}.mlp.down_proj", f"{p}.mlp.act_fn",
                    f"{p}.input_layernorm", f"{p}.post_attention_layernorm"]
    _param(weights, "model.norm", (h,), "norm", None)
    modules += ["model.norm", "model.rotary_emb", "lm_head"]
    weights.append(Weight(name="lm_head.weight", module="lm_head", shape=(arch.vocab, h), role="head",
                          tied_to="model.embed_tokens.weight" if arch.tied_embeddings else None))
    return weights, modules


def gpt2_layout(arch: ArchNumbers) -> tuple[list[Weight], list[str]]:
    """transformers' GPT2LMHeadModel: LayerNorm with bias, fused c_attn, Conv1D, learned positions."""
    h, inter = arch.hidden, arch.intermediate
    weights: list[Weight] = []
    modules = ["transformer", "transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h"]
    _param(weights, "transformer.wte", (arch.vocab, h), "embedding", None)
    _param(weights, "transformer.wpe", (arch.max_position, h), "embedding", None)
    for i in range(arch.layers):
        p = f"transformer.h.{i}"
        _param(weights, f"{p}.ln_1", (h,), "norm", i, h)
        _param(weights, f"{p}.attn.c_attn", (3 * h, h), "attn_qkv", i, 3 * h, transposed=True)
        _param(weights, f"{p}.attn.c_proj", (h, h), "attn_o", i, h, transposed=True)
        _param(weights, f"{p}.ln_2", (h,), "norm", i, h)
        _param(weights, f"{p}.mlp.c_fc", (inter, h), "mlp_up", i, inter, transposed=True)
        _param(weights, f"{p}.mlp.c_proj", (h, inter), "mlp_down", i, h, transposed=True)
        modules += [p, f"{p}.ln_1", f"{p}.attn", f"{p}.attn.c_attn", f"{p}.attn.c_proj",
                    f"{p}.attn.attn_dropout", f"{p}.attn.resid_dropout", f"{p}.ln_2", f"{p}.mlp",
                    f"{p}.mlp.c_fc", f"{p}.mlp.c_proj", f"{p}.mlp.act", f"{p}.mlp.dropout"]
    _param(weights, "transformer.ln_f", (h,), "norm", None, h)
    modules += ["transformer.ln_f", "lm_head"]
    weights.append(Weight(name="lm_head.weight", module="lm_head", shape=(arch.vocab, h), role="head",
                          tied_to="transformer.wte.weight" if arch.tied_embeddings else None))
    return weights, modules


def gemma3_layout(arch: ArchNumbers) -> tuple[list[Weight], list[str]]:
    """transformers' Gemma3ForCausalLM: the Llama projections, RMSNorm on each query and key head
    (`q_norm`, `k_norm`), four norms a block (before and after attention and the MLP), a scaled
    embedding, GELU-tanh MLP; the head is tied to the embedding."""
    h, q_out, kv_out, inter = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    weights: list[Weight] = []
    modules = ["model", "model.embed_tokens", "model.layers"]
    _param(weights, "model.embed_tokens", (arch.vocab, h), "embedding", None)
    bias = lambda n: n if arch.attention_bias else None  # noqa: E731
    for i in range(arch.layers):
        p = f"model.layers.{i}"
        _param(weights, f"{p}.self_attn.q_proj", (q_out, h), "attn_q", i, bias(q_out))
        _param(weights, f"{p}.self_attn.k_proj", (kv_out, h), "attn_k", i, bias(kv_out))
        _param(weights, f"{p}.self_attn.v_proj", (kv_out, h), "attn_v", i, bias(kv_out))
        _param(weights, f"{p}.self_attn.o_proj", (h, q_out), "attn_o", i, h if arch.attention_out_bias else None)
        _param(weights, f"{p}.self_attn.q_norm", (arch.head_dim,), "norm", i)
        _param(weights, f"{p}.self_attn.k_norm", (arch.head_dim,), "norm", i)
        _param(weights, f"{p}.mlp.gate_proj", (inter, h), "mlp_gate", i)
        _param(weights, f"{p}.mlp.up_proj", (inter, h), "mlp_up", i)
        _param(weights, f"{p}.mlp.down_proj", (h, inter), "mlp_down", i)
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
        for norm in norms:
            _param(weights, f"{p}.{norm}", (h,), "norm", i)
        modules += [p, f"{p}.self_attn", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                    f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj", f"{p}.self_attn.q_norm",
                    f"{p}.self_attn.k_norm", f"{p}.mlp", f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj",
                    f"{p}.mlp.down_proj", f"{p}.mlp.act_fn"] + [f"{p}.{norm}" for norm in norms]
    _param(weights, "model.norm", (h,), "norm", None)
    modules += ["model.norm", "model.rotary_emb", "lm_head"]
    weights.append(Weight(name="lm_head.weight", module="lm_head", shape=(arch.vocab, h), role="head",
                          tied_to="model.embed_tokens.weight" if arch.tied_embeddings else None))
    return weights, modules


LAYOUTS: dict[str, Layout] = {
    "llama": llama_layout,
    "mistral": llama_layout,
    "qwen2": llama_layout,
    "gpt2": gpt2_layout,
    "gemma3_text": gemma3_layout,
}
