"""The inventory as data: architecture numbers and one record per weight tensor.

Names are those of the model's Hugging Face transformers implementation whatever the source
format (`model.layers.3.mlp.down_proj.weight`), so `keep`/`within` selectors, the solver and the
executor all speak the same names. Shapes of linear weights are `(out_features, in_features)`.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict

Role = Literal[
    "embedding",  # token (or learned position) embedding table
    "attn_q", "attn_k", "attn_v", "attn_o",
    "attn_qkv",  # a fused q/k/v projection (GPT-2 `c_attn`)
    "mlp_gate", "mlp_up", "mlp_down",
    "norm",
    "head",  # the output projection to the vocabulary (`lm_head`)
]

LINEAR_ROLES = frozenset({"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv",
                          "mlp_gate", "mlp_up", "mlp_down", "head"})


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ArchNumbers(Record):
    """The numbers of a decoder-only transformer that every cost formula reads."""

    model_type: str  # "llama", "mistral", "qwen2", "gpt2", ...
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    attention_bias: bool = False  # bias on q/k/v
    attention_out_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    max_position: int = 2048
    gated_mlp: bool = True  # gate/up/down (SwiGLU) rather than up/down (GPT-2)
    norm_bias: bool = False  # LayerNorm with bias (GPT-2) rather than RMSNorm
    learned_positions: bool = False  # a position-embedding table (GPT-2) rather than RoPE
    # Gemma 3: layers that attend over the last `sliding_window` tokens only (their KV cache is bounded
    # by it), RMSNorm on each query/key head, norms before and after each sub-layer, the embedding
    # scaled by sqrt(hidden), a GELU (tanh) MLP.
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # the indices of the sliding-window layers (the rest attend fully)
    qk_norm: bool = False
    sandwich_norms: bool = False  # pre/post feed-forward norms and a post-attention norm on the sub-layer's output
    embedding_scale: float = 1.0

    def kv_tokens(self, layer: int, tokens: int) -> int:
        """Tokens layer `layer`'s KV cache holds after `tokens` tokens: all of them, or the window."""
        if self.sliding_window and layer in self.sliding_layers:
            return min(tokens, self.sliding_window)
        return tokens

    def attended(self, layer: int, position: float) -> float:
        """Positions a query at `position` attends over in layer `layer` (the window bounds a sliding one)."""
        if self.sliding_window and layer in self.sliding_layers:
            return min(position, float(self.sliding_window))
        return position


class Weight(Record):
    """One parameter tensor of the model."""

    name: str  # "model.layers.3.self_attn.q_proj.weight"
    module: str  # "model.layers.3.self_attn.q_proj"
    shape: tuple[int, ...]  # (out, in) for linears and embeddings (vocab, hidden)
    role: Role
    block: int | None = None  # transformer block index; None outside the blocks
    tied_to: str | None = None  # the weight name whose storage this one shares (tied lm_head)
    is_bias: bool = False
    transposed: bool = False  # HF stores it (in, out): GPT-2's Conv1D; `shape` is still (out, in)
    source_dtype: str | None = None  # "F32", "BF16", "Q4_1", ... as found in the source; None from a config
    # arch:/config: only (no weights read): the published checkpoint's dtype ("bf16", "fp16", "fp32",
    # from the config's `torch_dtype`), what a layer kept as it is holds; None: loaded as fp32
    checkpoint_dtype: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_linear(self) -> bool:
        """A 2-D weight applied as a matrix product (what quantization and pruning act on)."""
        return self.role in LINEAR_ROLES and not self.is_bias and len(self.shape) == 2


class Inventory(Record):
    """Everything the later stages know about a model without loading its weights."""

    source: str  # the model source as written: "gguf:models/x.gguf"
    arch: ArchNumbers
    weights: tuple[Weight, ...]
    modules: tuple[str, ...]  # every module name of the HF implementation, containers included, root excluded
    source_bytes: int | None = None  # bytes of the tensors in the source file(s); None from a config

    def module_names(self) -> list[str]:
        """Every module name of the HF implementation (`model.layers.3.mlp` included), root excluded."""
        return list(self.modules)

    def linear_layers(self) -> list[Weight]:
        """The matrix weights a format or prune level can be chosen for, tied heads included."""
        return [w for w in self.weights if w.is_linear]

    def weight(self, name: str) -> Weight:
        for w in self.weights:
            if w.name == name or (w.module == name and not w.is_bias):
                return w
        raise KeyError(name)

    def params(self) -> int:
        """Parameter count, tied weights counted once (the published convention)."""
        return sum(w.numel for w in self.weights if w.tied_to is None)
