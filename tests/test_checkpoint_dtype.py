"""A layer left as it is holds the checkpoint's dtype: `arch:`/`config:` models carry their published
config's `torch_dtype` (Llama 3.1: bf16, Llama 2: fp16), so the embedding and head a plan keeps are
priced, and shown, in it; a model whose weights lwdsl loads (as fp32) is unchanged."""
from __future__ import annotations

import json

from lwdsl.cost.terms import as_loaded, effective_format
from lwdsl.inventory.sources import from_arch, from_config
from lwdsl.solution import LayerChoice, QuantFormat


def _dtypes(inventory) -> set:
    return {w.checkpoint_dtype for w in inventory.weights}


def test_catalog_models_carry_their_checkpoint_dtype():
    assert _dtypes(from_arch("arch:llama-3.1-70b", "llama-3.1-70b", None)) == {"bf16"}
    assert _dtypes(from_arch("arch:llama-2-7b", "llama-2-7b", None)) == {"fp16"}
    assert _dtypes(from_arch("arch:gpt2", "gpt2", None)) == {None}  # its config names none: fp32


def test_a_config_file_names_its_own(tmp_path):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 100, "torch_dtype": "float16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _dtypes(from_config("config:config.json", tmp_path / "config.json", None)) == {"fp16"}


def test_kept_embedding_and_head_are_priced_in_bf16():
    inventory = from_arch("arch:llama-3.1-70b", "llama-3.1-70b", None)
    for name in ("model.embed_tokens", "lm_head", "model.layers.0.mlp.down_proj"):
        weight = inventory.weight(name)
        kept = LayerChoice(name=name, device="gpu0", compute_device="gpu0", kept=True)
        assert effective_format(weight, kept)[0] == QuantFormat(dtype="bf16")
    int8 = LayerChoice(name="lm_head", device="gpu0", compute_device="gpu0", format=QuantFormat(dtype="int8"))
    assert effective_format(inventory.weight("lm_head"), int8)[0] == QuantFormat(dtype="int8")


def test_estimate_weights_are_the_checkpoint_bytes(repo_root):
    from lwdsl.estimate import estimate, parse_settings
    from lwdsl.plans import load_plan

    plan_file = load_plan(repo_root / "plans" / "llama70b_two_gpus.lwp")
    report = estimate(plan_file.plan, plan_file.base_dir)
    params = report.model["params"]
    # every matrix in bf16; the norms (1.3 M values) as the executor holds them
    assert 2 * params <= report.memory["weights_bytes"] <= 2 * params + 4 * 1_400_000
    report = estimate(plan_file.plan, plan_file.base_dir, parse_settings(["weights=int8"]))
    embedding = 128256 * 8192
    assert report.memory["weights_bytes"] > 2 * 2 * embedding + (params - 2 * embedding)  # head and table bf16


def test_a_loaded_model_is_unchanged(smollm2_gguf):
    from lwdsl.inventory.sources import from_gguf

    inventory = from_gguf(f"gguf:{smollm2_gguf}", smollm2_gguf, None)
    assert as_loaded(inventory.weight("model.embed_tokens")) == QuantFormat()
