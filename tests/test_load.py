"""lwdsl.models.load: weights from a plan's model block, GGUF converted once, source untouched."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lwdsl import ast
from lwdsl.errors import LwdslError
from lwdsl.models.load import cache_key, cached_hf_folder, load_model, source_path


def _block(scheme: str, location: str) -> ast.ModelBlock:
    return ast.ModelBlock(source=f"{scheme}:{location}", scheme=scheme, location=location)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("scheme", ["arch", "config"])
def test_weightless_sources_are_refused_with_a_code(scheme, tmp_path):
    with pytest.raises(LwdslError) as caught:
        load_model(_block(scheme, "llama-3.1-70b"), tmp_path)
    assert caught.value.diagnostics[0].code == "E320"
    assert "need weights" in caught.value.diagnostics[0].message


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(LwdslError) as gguf:
        source_path(_block("gguf", "nope.gguf"), tmp_path)
    with pytest.raises(LwdslError) as hf:
        source_path(_block("hf", "nofolder"), tmp_path)
    assert (gguf.value.diagnostics[0].code, hf.value.diagnostics[0].code) == ("E321", "E322")


def test_relative_locations_resolve_against_the_plan_folder(smollm2_gguf):
    block = _block("gguf", f"{smollm2_gguf.parent.name}/{smollm2_gguf.name}")
    assert source_path(block, smollm2_gguf.parent.parent) == smollm2_gguf


def test_cache_key_follows_the_file_identity(tmp_path):
    file = tmp_path / "m.gguf"
    file.write_bytes(b"abc")
    first = cache_key(file)
    file.write_bytes(b"abcd")
    assert cache_key(file) != first


@pytest.mark.model
def test_gguf_is_converted_once_and_the_source_is_untouched(smollm2_gguf, smollm2_model):
    before = _digest(smollm2_gguf)
    stat_before = smollm2_gguf.stat()
    block = _block("gguf", str(smollm2_gguf))
    folder = cached_hf_folder(block, smollm2_gguf.parent)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert not any(p.name.startswith(f".{folder.name}.partial-") for p in folder.parent.iterdir())
    again = cached_hf_folder(block, smollm2_gguf.parent)
    assert again == folder
    assert _digest(smollm2_gguf) == before
    assert smollm2_gguf.stat().st_mtime_ns == stat_before.st_mtime_ns


@pytest.mark.model
def test_loaded_model_matches_the_architecture_and_speaks(smollm2_model):
    model, tokenizer = smollm2_model
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"


@pytest.mark.model
def test_hf_folder_loads_as_is(smollm2_gguf, smollm2_model):
    folder = cached_hf_folder(_block("gguf", str(smollm2_gguf)), smollm2_gguf.parent)
    model, _ = load_model(_block("hf", str(folder)), Path("/"), dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    reference = smollm2_model[0].model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight.float(), reference.bfloat16().float())
