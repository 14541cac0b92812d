"""Inventory: published parameter counts, HF module names, every source scheme, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lwdsl.ast import ModelBlock
from lwdsl.errors import ExitCode, LwdslError
from lwdsl.inventory import architecture_entry, architecture_ids, hf_name, load_inventory

# The published exact counts (safetensors totals on each model page), tied weights counted once.
PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
    "gpt2": 124_439_808,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-3-270m": 268_098_176,
    "gemma-3-1b": 999_885_952,
}


def block(source: str) -> ModelBlock:
    scheme, location = source.split(":", 1)
    return ModelBlock(source=source, scheme=scheme, location=location)


@pytest.mark.parametrize("arch_id", sorted(PUBLISHED_PARAMS))
def test_catalog_params_equal_published_counts(arch_id):
    inventory = load_inventory(block(f"arch:{arch_id}"), Path("."))
    assert inventory.params() == PUBLISHED_PARAMS[arch_id]
    assert architecture_entry(arch_id)["params"] == PUBLISHED_PARAMS[arch_id]


def test_catalog_lists_every_pinned_architecture():
    assert set(PUBLISHED_PARAMS) <= set(architecture_ids())


def test_gguf_names_map_to_hf_modules():
    assert hf_name("blk.7.attn_q.weight", "llama") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight", "llama") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert hf_name("output.weight", "llama") == "lm_head.weight"
    assert hf_name("output_norm.weight", "llama") == "model.norm.weight"
    assert hf_name("blk.2.attn_qkv.bias", "gpt2") == "transformer.h.2.attn.c_attn.bias"
    assert hf_name("rope_freqs.weight", "llama") is None


def _transformers_modules(model_cls, config) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    names = [name for name, _ in model.named_modules() if name]
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return names, params


@pytest.mark.model
def test_smollm2_gguf_matches_transformers_llama(smollm2_gguf):
    from transformers import LlamaConfig, LlamaForCausalLM

    inventory = load_inventory(block(f"gguf:{smollm2_gguf}"), Path("."))
    arch = inventory.arch
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.intermediate, arch.vocab) == (
        30, 576, 9, 3, 1536, 49152)
    assert arch.tied_embeddings and inventory.params() == PUBLISHED_PARAMS["smollm2-135m"]
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    names, params = _transformers_modules(LlamaForCausalLM, config)
    assert inventory.module_names() == names
    untied = {w.name: w.shape for w in inventory.weights if w.tied_to is None}
    assert untied == params
    assert inventory.weight("lm_head").tied_to == "model.embed_tokens.weight"
    assert {w.source_dtype for w in inventory.linear_layers() if w.tied_to is None} == {"Q4_1"}
    assert inventory.source_bytes == 96_576_768  # the tensor data: the file less its 1,785,664-byte header
    assert len(inventory.linear_layers()) == 30 * 7 + 1


def test_gpt2_layout_matches_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    inventory = load_inventory(block("arch:gpt2"), Path("."))
    names, params = _transformers_modules(GPT2LMHeadModel, GPT2Config())
    assert inventory.module_names() == names
    # Conv1D keeps (in, out); the inventory always says (out, in) and marks it.
    hf_shapes = {w.name: (tuple(reversed(w.shape)) if w.transposed else w.shape)
                 for w in inventory.weights if w.tied_to is None}
    assert hf_shapes == params
    assert inventory.weight("transformer.h.0.attn.c_attn").shape == (2304, 768)


def test_qwen2_biases_match_transformers(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    numbers = dict(architecture_entry("qwen2.5-0.5b")["config"], num_hidden_layers=2)
    (tmp_path / "qwen.json").write_text(json.dumps(numbers))
    inventory = load_inventory(block("config:qwen.json"), tmp_path)
    config = Qwen2Config(**{k: v for k, v in numbers.items() if k != "model_type"})
    names, params = _transformers_modules(Qwen2ForCausalLM, config)
    assert inventory.module_names() == names
    assert {w.name: w.shape for w in inventory.weights if w.tied_to is None} == params
    assert inventory.weight("model.layers.0.self_attn.q_proj.bias").shape == (896,)


def test_hf_folder_reads_safetensors_headers(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "tiny")
    inventory = load_inventory(block("hf:tiny"), tmp_path)
    assert inventory.params() == sum(p.numel() for p in model.parameters())
    assert inventory.source_bytes == 4 * inventory.params()
    assert {w.source_dtype for w in inventory.weights} == {"F32"}


def test_config_source_and_relative_path(tmp_path):
    config = dict(architecture_entry("llama-2-7b")["config"])
    (tmp_path / "c.json").write_text(json.dumps(config))
    inventory = load_inventory(block("config:c.json"), tmp_path)
    assert inventory.params() == PUBLISHED_PARAMS["llama-2-7b"]
    assert inventory.source_bytes is None


def test_gguf_header_reader_agrees_with_gguf_py(smollm2_gguf, tmp_path):
    """The header walk (arrays stepped over) gives gguf-py's tensors and scalar fields; a file cut
    inside its header is an error, not a short read."""
    import gguf

    from lwdsl.inventory.gguf_header import read_header

    header, reference = read_header(smollm2_gguf), gguf.GGUFReader(str(smollm2_gguf))
    assert [(t.name, t.type_name, t.shape, t.n_bytes) for t in header.tensors] == [
        (t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.n_bytes))
        for t in reference.tensors]
    scalars = {k: f.contents() for k, f in reference.fields.items()
               if not k.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert header.fields.keys() == scalars.keys()
    assert all(header.fields[k] == pytest.approx(v) if isinstance(v, float) else header.fields[k] == v
               for k, v in scalars.items())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="ends inside its header"):
        read_header(cut)
    with pytest.raises(LwdslError) as error:
        load_inventory(block("gguf:cut.gguf"), tmp_path)
    assert error.value.diagnostics[0].code == "E302"


@pytest.mark.parametrize("source, code", [
    ("arch:llama-9-1t", "E303"),
    ("gguf:missing.gguf", "E301"),
    ("hf:missing-dir", "E301"),
    ("config:missing.json", "E301"),
    ("config:bad.json", "E302"),
    ("config:bert.json", "E304"),
    ("config:partial.json", "E305"),
    ("gguf:bad.gguf", "E302"),
])
def test_bad_sources_are_positioned_errors(tmp_path, source, code):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "partial.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LwdslError) as error:
        load_inventory(block(source), tmp_path)
    assert error.value.diagnostics[0].code == code
    assert error.value.exit_code == ExitCode.BAD_INPUT


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[int, ...]], numbers: dict[str, int]) -> None:
    """A real GGUF file (gguf-py's writer) holding zero tensors of torch shape (out, in)."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(numbers["layers"])
    writer.add_embedding_length(numbers["hidden"])
    writer.add_feed_forward_length(numbers["intermediate"])
    writer.add_head_count(numbers["heads"])
    writer.add_head_count_kv(numbers.get("kv_heads", numbers["heads"]))
    writer.add_context_length(numbers["context"])
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_gpt2_fused_qkv_and_learned_positions(tmp_path):
    h, inter, vocab, positions = 32, 128, 100, 64
    tensors = {"token_embd.weight": (vocab, h), "position_embd.weight": (positions, h),
               "output_norm.weight": (h,), "output_norm.bias": (h,)}
    for i in range(2):
        tensors.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.attn_norm.bias": (h,),
                        f"blk.{i}.attn_qkv.weight": (3 * h, h), f"blk.{i}.attn_qkv.bias": (3 * h,),
                        f"blk.{i}.attn_output.weight": (h, h), f"blk.{i}.attn_output.bias": (h,),
                        f"blk.{i}.ffn_norm.weight": (h,), f"blk.{i}.ffn_norm.bias": (h,),
                        f"blk.{i}.ffn_up.weight": (inter, h), f"blk.{i}.ffn_up.bias": (inter,),
                        f"blk.{i}.ffn_down.weight": (h, inter), f"blk.{i}.ffn_down.bias": (h,)})
    _write_gguf(tmp_path / "g.gguf", "gpt2", tensors,
                {"layers": 2, "hidden": h, "intermediate": inter, "heads": 4, "context": positions})
    inventory = load_inventory(block("gguf:g.gguf"), tmp_path)
    assert inventory.arch.model_type == "gpt2" and inventory.arch.tied_embeddings
    assert inventory.params() == sum(math.prod(s) for s in tensors.values())
    assert inventory.weight("transformer.h.1.attn.c_attn").shape == (3 * h, h)
    assert inventory.weight("transformer.wpe").shape == (positions, h)
    assert inventory.weight("lm_head").tied_to == "transformer.wte.weight"


def test_gguf_untied_llama_has_its_own_head(tmp_path):
    h, inter, vocab = 32, 64, 50
    tensors = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,), "output.weight": (vocab, h)}
    for name, shape in {"attn_norm": (h,), "ffn_norm": (h,), "attn_q": (h, h), "attn_k": (16, h),
                        "attn_v": (16, h), "attn_output": (h, h), "ffn_gate": (inter, h), "ffn_up": (inter, h),
                        "ffn_down": (h, inter)}.items():
        tensors[f"blk.0.{name}.weight"] = shape
    _write_gguf(tmp_path / "l.gguf", "llama", tensors,
                {"layers": 1, "hidden": h, "intermediate": inter, "heads": 4, "kv_heads": 2, "context": 128})
    inventory = load_inventory(block("gguf:l.gguf"), tmp_path)
    assert not inventory.arch.tied_embeddings and inventory.arch.kv_heads == 2 and inventory.arch.vocab == vocab
    assert inventory.weight("lm_head").tied_to is None
    assert inventory.params() == sum(math.prod(s) for s in tensors.values())
    # a GGUF whose tensors disagree with its metadata is refused, with words
    tensors["blk.0.ffn_down.weight"] = (h, inter + 1)
    _write_gguf(tmp_path / "bad.gguf", "llama", tensors,
                {"layers": 1, "hidden": h, "intermediate": inter, "heads": 4, "kv_heads": 2, "context": 128})
    with pytest.raises(LwdslError) as error:
        load_inventory(block("gguf:bad.gguf"), tmp_path)
    assert error.value.diagnostics[0].code == "E305" and "ffn_down" not in error.value.diagnostics[0].message


def test_hf_gpt2_folder_conv1d_weights(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64))
    model.save_pretrained(tmp_path / "gpt2")
    inventory = load_inventory(block("hf:gpt2"), tmp_path)
    assert inventory.params() == sum(p.numel() for p in model.parameters())
    c_attn = inventory.weight("transformer.h.0.attn.c_attn")
    assert c_attn.transposed and c_attn.shape == (96, 32)  # stored (32, 96) by Conv1D
    assert tuple(model.get_parameter("transformer.h.0.attn.c_attn.weight").shape) == (32, 96)
    assert inventory.module_names() == [n for n, _ in model.named_modules() if n]
