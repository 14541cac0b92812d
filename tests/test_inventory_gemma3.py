"""Gemma 3 and Qwen2 as lwdsl reads them: module names and shapes against transformers, the sliding
window's layers, the real k-quant GGUF files (when fetched), and the cost terms that depend on them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lwdsl.ast import InferenceWorkload, ModelBlock
from lwdsl.cost import terms
from lwdsl.inventory import architecture_entry, load_inventory

ROOT = Path(__file__).resolve().parents[1]
QWEN = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GEMMA = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def block(source: str) -> ModelBlock:
    scheme, location = source.split(":", 1)
    return ModelBlock(source=source, scheme=scheme, location=location)


def test_gemma3_layout_matches_transformers(tmp_path):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    numbers = dict(architecture_entry("gemma-3-270m")["config"], num_hidden_layers=7)
    (tmp_path / "g.json").write_text(json.dumps(numbers))
    inventory = load_inventory(block("config:g.json"), tmp_path)
    config = Gemma3TextConfig(**{k: v for k, v in numbers.items() if k != "model_type"})
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    assert inventory.module_names() == [name for name, _ in model.named_modules() if name]
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {w.name: w.shape for w in inventory.weights if w.tied_to is None} == params
    arch = inventory.arch
    # transformers' own layer types: every sixth layer attends fully
    assert arch.sliding_layers == tuple(i for i, t in enumerate(config.layer_types) if t == "sliding_attention")
    assert arch.sliding_layers == (0, 1, 2, 3, 4, 6) and arch.sliding_window == 512
    assert arch.qk_norm and arch.sandwich_norms and arch.tied_embeddings
    assert inventory.weight("lm_head").tied_to == "model.embed_tokens.weight"


def test_sliding_window_bounds_the_kv_cache_and_attention(tmp_path):
    from lwdsl.hardware.records import DeviceSpec, ResolvedTarget

    inventory = load_inventory(block("arch:gemma-3-270m"), Path("."))
    arch = inventory.arch
    device = DeviceSpec(name="cpu0", kind="cpu", memory_bytes=16 * 2**30, bandwidth_Bps=20e9,
                        rates={"fp32": 1e11}, op_overhead_s=1e-5)
    target = ResolvedTarget(name="t", devices={"cpu0": device})
    from lwdsl.solution import QuantFormat

    long = InferenceWorkload(batch=1, context=2048, generate=64)
    full = terms.attention_terms(arch, "cpu0", target, long, QuantFormat(), layer=5)
    window = terms.attention_terms(arch, "cpu0", target, long, QuantFormat(), layer=0)
    per_token = 2 * arch.kv_heads * arch.head_dim * 4
    assert full.weight_bytes == (2048 + 64) * per_token
    assert window.weight_bytes == 512 * per_token  # bounded by the window, not the request
    assert window.token_s < full.token_s
    short = InferenceWorkload(batch=1, context=100, generate=8)  # shorter than the window: no difference
    assert terms.attention_terms(arch, "cpu0", target, short, QuantFormat(), layer=0) == \
        terms.attention_terms(arch, "cpu0", target, short, QuantFormat(), layer=5)


@pytest.mark.skipif(not GEMMA.is_file(), reason="fetch it: python -m lwdsl.models.fetch --dest models gemma-3-270m")
def test_real_gemma3_gguf_inventory():
    inventory = load_inventory(block(f"gguf:{GEMMA}"), Path("."))
    arch = inventory.arch
    assert (arch.model_type, arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim, arch.vocab) == \
        ("gemma3_text", 18, 640, 4, 1, 256, 262144)
    assert arch.sliding_window == 512 and len(arch.sliding_layers) == 15
    assert inventory.params() == architecture_entry("gemma-3-270m")["params"]
    assert inventory.weight("model.embed_tokens").source_dtype == "Q8_0"
    assert inventory.weight("model.layers.0.self_attn.q_norm").source_dtype == "F32"
    assert inventory.weight("model.layers.3.post_feedforward_layernorm").shape == (640,)


@pytest.mark.skipif(not QWEN.is_file(), reason="fetch it: python -m lwdsl.models.fetch --dest models qwen2.5-coder-0.5b")
def test_real_qwen2_gguf_inventory_has_biases_and_its_own_head():
    inventory = load_inventory(block(f"gguf:{QWEN}"), Path("."))
    arch = inventory.arch
    assert (arch.model_type, arch.layers, arch.heads, arch.kv_heads, arch.attention_bias, arch.tied_embeddings) == \
        ("qwen2", 24, 14, 2, True, False)
    assert inventory.weight("model.layers.0.self_attn.k_proj.bias").shape == (128,)
    assert inventory.weight("lm_head").tied_to is None
    assert {w.source_dtype for w in inventory.linear_layers()} >= {"Q5_0", "Q6_K", "Q8_0", "Q4_K"}
