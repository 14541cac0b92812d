"""A Gemma 3 model through solve, apply, load and decode: a small one made here (random weights, the
real Gemma3ForCausalLM, SmolLM2's tokenizer), so every stage runs on the Gemma layout in seconds —
its scaled embedding, q/k norms, four norms a block and a sliding-window layer beside a full one."""
from __future__ import annotations


import pytest
import torch

from lwdsl.cli import main
from tests.synthetic_gguf import apply_quantized

PLAN = """plan tiny_gemma {{
  model "hf:{folder}"
  target {{ device cpu0 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }} }}
  workload inference {{ batch 1; context 16; generate 8 }}
  allow {{ quantize weights int8; keep "model.embed_tokens" }}
  minimize memory
}}
"""


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, smollm2_gguf):
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from lwdsl import ast
    from lwdsl.models.load import cached_hf_folder

    smollm2 = cached_hf_folder(ast.ModelBlock(source=f"gguf:{smollm2_gguf}", scheme="gguf",
                                              location=str(smollm2_gguf)), smollm2_gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = Gemma3TextConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=256)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("gemma") / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.model
def test_tiny_gemma3_applies_loads_and_decodes(tiny_gemma, tmp_path, capsys):
    from lwdsl.artifact import load
    from lwdsl.inventory import load_inventory
    from lwdsl.plans import load_plan
    from lwdsl.runtime.generate import decode

    folder, original, tokenizer = tiny_gemma
    plan = tmp_path / "tiny_gemma.lwp"
    plan.write_text(PLAN.format(folder=folder))
    inventory = load_inventory(load_plan(plan).plan.model, tmp_path)
    assert inventory.arch.sliding_layers == (0,) and inventory.arch.sliding_window == 8
    out = tmp_path / "artifact"
    apply_quantized(plan, out, capsys)
    model = load(out)
    assert model.model.embed_tokens.embed_scale.item() == pytest.approx(64 ** 0.5)
    ids = tokenizer("Alice was beginning to get very tired of sitting", return_tensors="pt").input_ids
    with torch.inference_mode():  # past the window of 8: the sliding layer's cache is cut
        ours, theirs = model(ids).logits[0, -1], original(ids).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > 0.99
    run = decode(model, ids, 12, stop_at_eos=False)
    assert len(run.token_ids) == 12
    assert run.step == "fused"  # Gemma 3's block in the native step (test_fused.py: its numerics)
    assert main(["run", str(out), "--prompt", "Alice", "--max-new-tokens", "4"]) == 0
