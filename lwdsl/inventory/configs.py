"""A Hugging Face `config.json` (as a dict) -> `ArchNumbers`, one reader per config dialect.

Defaults are those of the transformers config classes (`LlamaConfig`, `MistralConfig`,
`Qwen2Config`, `GPT2Config`, `Gemma3TextConfig`) so that a config written sparsely means what transformers reads.
"""
from __future__ import annotations

from typing import Any, Callable

from lwdsl.inventory.records import ArchNumbers


def _llama_family(config: dict[str, Any], model_type: str) -> ArchNumbers:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    qwen = model_type == "qwen2"
    # Qwen2Attention: q/k/v with bias, o without (modeling_qwen2.py); Llama: `attention_bias` on all four.
    attention_bias = True if qwen else bool(config.get("attention_bias", False))
    return ArchNumbers(
        model_type=model_type,
        layers=int(config["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        attention_out_bias=attention_bias and not qwen,
        mlp_bias=bool(config.get("mlp_bias", False)),
        max_position=int(config.get("max_position_embeddings", 2048)),
    )


def _gpt2(config: dict[str, Any], model_type: str) -> ArchNumbers:
    hidden = int(config.get("n_embd", 768))
    heads = int(config.get("n_head", 12))
    return ArchNumbers(
        model_type=model_type,
        layers=int(config.get("n_layer", 12)),
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        intermediate=int(config.get("n_inner") or 4 * hidden),
        vocab=int(config.get("vocab_size", 50257)),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        max_position=int(config.get("n_positions", 1024)),
        gated_mlp=False,
        norm_bias=True,
        learned_positions=True,
    )


def _gemma3(config: dict[str, Any], model_type: str) -> ArchNumbers:
    """transformers' Gemma3TextConfig (`gemma3_text`; a multimodal `gemma3` config's `text_config`):
    every sixth layer attends fully, the others over a sliding window (`layer_types`)."""
    if "text_config" in config and "hidden_size" not in config:
        config = {**config["text_config"], "model_type": "gemma3_text"}
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    window = config.get("sliding_window", 4096)
    types = config.get("layer_types")
    if not types:
        pattern = int(config.get("sliding_window_pattern", 6) or 0)
        types = ["full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention") if window else ()
    bias = bool(config.get("attention_bias", False))
    return ArchNumbers(
        model_type="gemma3_text",
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or 256),
        intermediate=int(config["intermediate_size"]),
        vocab=int(config.get("vocab_size", 262208)),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        attention_bias=bias,
        attention_out_bias=bias,
        max_position=int(config.get("max_position_embeddings", 131072)),
        sliding_window=int(window) if window else None,
        sliding_layers=sliding,
        qk_norm=True,
        sandwich_norms=True,
        embedding_scale=hidden ** 0.5,
    )


CONFIG_READERS: dict[str, Callable[[dict[str, Any], str], ArchNumbers]] = {
    "llama": _llama_family,
    "mistral": _llama_family,
    "qwen2": _llama_family,
    "gpt2": _gpt2,
    "gemma3_text": _gemma3,
    "gemma3": _gemma3,
}


def arch_from_config(config: dict[str, Any]) -> ArchNumbers:
    """Read the numbers of a config dict; KeyError for a missing key, LookupError for an unknown type.

    >>> arch_from_config({"model_type": "gpt2"}).hidden
    768
    """
    model_type = str(config.get("model_type", ""))
    reader = CONFIG_READERS.get(model_type)
    if reader is None:
        raise LookupError(model_type)
    return reader(config, model_type)
