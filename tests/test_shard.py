"""Tensor parallelism on the real SmolLM2 weights: two gloo processes under `torchrun` give the
unsharded logits and the same greedy tokens. Four blocks are enough (every block is split the same
way); the 3 kv groups split unevenly, 2 + 1, which is the case that needs care."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lwdsl.apply.shard import _inputs_to, place_pipeline, split
from lwdsl.runtime.generate import decode

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 4
PROMPT = "The capital of France is"

WORKER = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    torch.set_num_threads(1)
    from lwdsl import ast
    from lwdsl.apply.quantize import quantize_module
    from lwdsl.apply.registry import ApplyContext
    from lwdsl.apply.shard import init_from_env, shard_model
    from lwdsl.models.load import load_model
    from lwdsl.runtime.generate import decode
    from lwdsl.solution import QuantFormat
    rank, world = init_from_env("gloo")
    gguf, out, blocks = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    model, tokenizer = load_model(ast.ModelBlock(source=f"gguf:{gguf}", scheme="gguf", location=str(gguf)), gguf.parent)
    model.model.layers = model.model.layers[:blocks]
    mlp = model.model.layers[1].mlp  # a quantized pair too: sliced in its packed form
    mlp.down_proj = quantize_module(mlp.down_proj, QuantFormat(dtype="int8"), ApplyContext(options={"kernel": "dequant_fp32"}))
    mlp.up_proj = quantize_module(mlp.up_proj, QuantFormat(dtype="int4", group=32), ApplyContext(options={"kernel": "dequant_fp32"}))
    shard_model(model, rank, world)
    ids = tokenizer(sys.argv[4], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    tokens = decode(model, ids, max_new_tokens=6).token_ids
    shapes = [tuple(model.model.layers[0].self_attn.k_proj.weight.shape), tuple(mlp.up_proj.packed().codes.shape)]
    torch.save({"logits": logits, "tokens": tokens, "shapes": shapes}, out / f"rank{rank}.pt")
""")


@pytest.fixture(scope="module")
def reference(smollm2_model):
    from lwdsl.apply.quantize import quantize_module
    from lwdsl.apply.registry import ApplyContext
    from lwdsl.solution import QuantFormat

    model, tokenizer = smollm2_model
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:BLOCKS]
    mlp = small.model.layers[1].mlp
    plain = ApplyContext(options={"kernel": "dequant_fp32"})
    mlp.down_proj = quantize_module(mlp.down_proj, QuantFormat(dtype="int8"), plain)
    mlp.up_proj = quantize_module(mlp.up_proj, QuantFormat(dtype="int4", group=32), plain)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = small(ids).logits[0]
    return small, ids, logits, decode(small, ids, max_new_tokens=6).token_ids


def test_two_gloo_ranks_match_the_unsharded_logits(reference, smollm2_gguf, tmp_path):
    _, _, logits, tokens = reference
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", _free_port(),
               str(tmp_path / "worker.py"), str(smollm2_gguf), str(tmp_path), str(BLOCKS), PROMPT]
    (tmp_path / "worker.py").write_text(WORKER)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["shapes"][0] == (128, 576) and ranks[1]["shapes"][0] == (64, 576)  # kv groups 2 + 1
    assert ranks[0]["shapes"][1] == (768, 288) and ranks[1]["shapes"][1] == (768, 288)  # int4 codes halved
    for result in ranks:
        # Same weights, same products; only the order of the final sums differs (two partial sums
        # added by all_reduce), so float32 rounding is all that may differ: ~1e-6 of logits of ~20.
        assert torch.allclose(result["logits"], logits, atol=1e-3, rtol=0)
        assert result["tokens"] == tokens


def _free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def test_split_is_even_and_covers_everything():
    assert [split(3, 2, r) for r in range(2)] == [(0, 2), (2, 3)]
    assert [split(1536, 4, r) for r in range(4)] == [(0, 384), (384, 768), (768, 1152), (1152, 1536)]


def _hooked(module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


@pytest.mark.parametrize("io, hooked", [(None, [False, True, True, True]), ("cpu:0", [True, True, False, False])])
def test_pipeline_follows_uneven_stages_and_keeps_the_output(reference, io, hooked):
    """One block on one device and three on another, as the solver may choose. `cpu` and `cpu:0` are
    two devices to the placement (hooks at every boundary), one memory to torch, so the real hooks run
    here: blocks off the embedding's device, or after a device change, are hooked; the others not."""
    small, ids, logits, tokens = reference
    placed = copy.deepcopy(small)
    stages = ["cpu", "cpu:0", "cpu:0", "cpu:0"]
    assert place_pipeline(placed, stages, io) == dict(enumerate(stages))
    assert [_hooked(layer) for layer in placed.model.layers] == hooked
    assert _hooked(placed.model.norm) == (stages[-1] != (io or stages[0]))
    assert placed.lwdsl_placement.pipelined and placed.lwdsl_placement.io == (io or "cpu")
    with torch.no_grad():
        assert torch.equal(placed(ids).logits[0], logits)
    run = decode(placed, ids, max_new_tokens=6)
    assert run.token_ids == tokens
    assert run.step.startswith("eager: pipelined over ")


def test_one_device_pipeline_adds_no_hooks(reference):
    small, ids, logits, _ = reference
    placed = copy.deepcopy(small)
    place_pipeline(placed, ["cpu"] * BLOCKS)
    assert not any(_hooked(module) for module in placed.modules())
    assert not placed.lwdsl_placement.pipelined
    with torch.no_grad():
        assert torch.equal(placed(ids).logits[0], logits)


def test_block_hooks_move_keyword_arguments_too():
    """The forward hands the rotary cos/sin and the mask to every block as keywords: they must move."""
    hook = _inputs_to(torch.device("meta"))
    args, kwargs = hook(None, (torch.ones(2),), {"position_embeddings": (torch.ones(2), torch.ones(2)),
                                                 "attention_mask": torch.ones(2), "cache": object()})
    assert args[0].is_meta and all(t.is_meta for t in kwargs["position_embeddings"])
    assert kwargs["attention_mask"].is_meta and not isinstance(kwargs["cache"], torch.Tensor)


def test_stages_must_cover_every_block(reference):
    from lwdsl.errors import LwdslError

    with pytest.raises(LwdslError) as error:
        place_pipeline(copy.deepcopy(reference[0]), ["cpu"] * (BLOCKS - 1))
    assert error.value.diagnostics[0].code == "E648"
