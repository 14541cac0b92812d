"""Models of the supported families that lwdsl's shipped plans do not use, as GGUF files with the
k-quant mixes real files have (tests/synthetic_gguf.py): a tied-head Qwen2 and a Gemma-3-1B-like
Gemma 3. The same commands a user runs on the shipped models must work on them unchanged:
inventory, load (the converted weights are exactly what `gguf` dequantizes), solve, apply, load the
artifact, decode, `lwdsl run`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lwdsl import ast
from lwdsl.cli import main
from lwdsl.inventory import load_inventory
from tests.synthetic_gguf import GEMMA3_1B_LIKE, QWEN2_TIED, apply_quantized, dequantized, write_gguf

PLAN = """plan {name} {{
  model "gguf:{file}"
  target {{ device cpu0 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }} }}
  workload inference {{ batch 1; context 32; generate 8 }}
  allow {{ quantize weights int8, int4 group 32; keep "model.embed_tokens" }}
  minimize memory
}}
"""
FAMILIES = {"qwen2_tied": QWEN2_TIED, "gemma3_1b_like": GEMMA3_1B_LIKE}
# GGUF tensor part -> the HF module lwdsl names it by
MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    spec = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    path = write_gguf(folder / f"{request.param}.gguf", spec)
    return request.param, spec, path


def test_the_files_mix_every_tensor_type_real_ones_do():
    used = {kind for spec in FAMILIES.values()
            for kinds in (spec.types, *spec.layer_types.values()) for kind in kinds.values()}
    assert used >= {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0", "Q4_0", "F16", "BF16"}


def _block(path: Path) -> ast.ModelBlock:
    return ast.ModelBlock(source=f"gguf:{path}", scheme="gguf", location=str(path))


def test_inventory_reads_the_family_and_every_tensor_type(family):
    name, spec, path = family
    inventory = load_inventory(_block(path), path.parent)
    arch = inventory.arch
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim) == \
        (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.head_dim)
    assert arch.tied_embeddings and inventory.weight("lm_head").tied_to == "model.embed_tokens.weight"
    for block in range(spec.layers):
        kinds = {**spec.types, **spec.layer_types.get(block, {})}
        for part, module in MODULES.items():
            assert inventory.weight(f"model.layers.{block}.{module}").source_dtype == kinds[part]
    assert inventory.weight("model.embed_tokens").source_dtype == spec.types["token_embd"]
    if spec.gemma:
        assert arch.model_type == "gemma3_text" and arch.qk_norm and arch.sandwich_norms
        assert arch.sliding_window == spec.sliding_window and arch.sliding_layers == (0, 1, 2, 3, 4, 6)
    else:
        assert arch.model_type == "qwen2" and arch.attention_bias
        assert inventory.weight("model.layers.0.self_attn.q_proj.bias").shape == (spec.heads * spec.head_dim,)


def test_load_gives_exactly_the_dequantized_file(family):
    from lwdsl.models.load import load_model

    name, spec, path = family
    model, tokenizer = load_model(_block(path), path.parent)
    state = model.state_dict()
    types = {}
    for block in range(spec.layers):
        for part, module in MODULES.items():
            kind = {**spec.types, **spec.layer_types.get(block, {})}[part]
            types.setdefault(kind, (f"blk.{block}.{part}.weight", f"model.layers.{block}.{module}.weight"))
    types[spec.types["token_embd"] + " embedding"] = ("token_embd.weight", "model.embed_tokens.weight")
    for gguf_name, hf in types.values():
        assert torch.equal(state[hf].float(), torch.from_numpy(dequantized(path, gguf_name))), gguf_name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = tokenizer("Alice was beginning to get very tired", return_tensors="pt").input_ids
    assert (ids[0, 0].item() == tokenizer.bos_token_id) == spec.gemma  # Gemma's tokenizer leads with BOS
    assert torch.isfinite(model(ids).logits).all()


def test_solve_apply_load_decode_and_run(family, tmp_path, capsys):
    from lwdsl.artifact import load
    from lwdsl.models.load import load_model
    from lwdsl.runtime.generate import decode

    name, spec, path = family
    plan = tmp_path / f"{name}.lwp"
    plan.write_text(PLAN.format(name=name, file=path))
    assert main(["solve", str(plan), "--json"]) == 0
    solved = json.loads(capsys.readouterr().out)
    formats = {layer["name"]: layer["format"] for layer in solved["layers"]}
    assert set(formats) >= {f"model.layers.{b}.{m}" for b in range(spec.layers) for m in MODULES.values()}
    out = tmp_path / "artifact"
    apply_quantized(plan, out, capsys)
    model = load(out)
    original, tokenizer = load_model(_block(path), path.parent)
    ids = tokenizer("Alice was beginning to get very tired of sitting by her sister", return_tensors="pt").input_ids
    with torch.inference_mode():
        ours, theirs = model(ids).logits[0], original(ids).logits[0]
    # int4 g32 on random k-quant weights: close to the original, not equal to it
    similarity = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert similarity.min() > 0.9 and not torch.equal(ours, theirs)
    run = decode(model, ids, 6, stop_at_eos=False)
    assert len(run.token_ids) == 6
    from lwdsl.apply import native

    if native.available():  # q/k/v biases and a tied head, or Gemma 3's block, in the native step
        assert run.step == "fused"
    assert main(["run", str(out), "--prompt", "Alice was", "--max-new-tokens", "4"]) == 0
    assert np.isfinite(similarity.numpy()).all()
