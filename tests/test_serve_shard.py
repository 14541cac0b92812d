"""The serving executor under tensor parallelism: two gloo ranks (`torchrun`), each holding its shard
of the real SmolLM2's first four blocks (an int8 and an int4 layer among them, sliced in packed form),
give the unsharded executor's logits for a prefill and a decode step (NCCL runs the same code)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 4
PROMPT = "The capital of France is"

WORKER = textwrap.dedent("""
    import os, sys, torch
    from pathlib import Path
    torch.set_num_threads(1)
    from lwdsl import ast
    from lwdsl.apply.shard import init_from_env, shard_model
    from lwdsl.models.load import load_model
    sys.path.insert(0, sys.argv[4])
    from test_serve_shard import prepare, served
    rank, world = init_from_env("gloo")
    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    model, tokenizer = load_model(ast.ModelBlock(source=f"gguf:{gguf}", scheme="gguf", location=str(gguf)), gguf.parent)
    model = prepare(model)
    shard_model(model, rank, world)
    ids = tokenizer(sys.argv[3], return_tensors="pt").input_ids
    logits, kernels = served(model, ids)
    torch.save({"logits": logits, "kernels": kernels}, out / f"rank{rank}.pt")
""")


def prepare(model):
    """Four blocks; block 1's MLP down projection int8, its up projection int4 g32."""
    from lwdsl.apply.quantize import quantize_module
    from lwdsl.apply.registry import ApplyContext
    from lwdsl.solution import QuantFormat

    model.model.layers = model.model.layers[:BLOCKS]
    model.config.num_hidden_layers = BLOCKS
    mlp = model.model.layers[1].mlp
    plain = ApplyContext(options={"kernel": "dequant_fp32"})
    mlp.down_proj = quantize_module(mlp.down_proj, QuantFormat(dtype="int8"), plain)
    mlp.up_proj = quantize_module(mlp.up_proj, QuantFormat(dtype="int4", group=32), plain)
    return model


def served(model, ids):
    """The executor's logits after the prompt but its last token, and after a decode step of it."""
    from lwdsl.runtime.serve import Serve

    with torch.inference_mode():
        executor = Serve(model, 1, ids.shape[1] + 2)
        first = executor.forward(ids[:, :-1], 0)[0]
        second = executor.forward(ids[:, -1:], ids.shape[1] - 1)[0]
    mlp = model.model.layers[1].mlp
    return torch.stack([first, second]), [type(mlp.down_proj).__name__, mlp.down_proj.kernel, mlp.up_proj.kernel]


def test_two_gloo_ranks_give_the_unsharded_executor_logits(smollm2_model, smollm2_gguf, tmp_path):
    model, tokenizer = smollm2_model
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected, _ = served(prepare(copy.deepcopy(model)), ids)
    (tmp_path / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", _free_port(),
               str(tmp_path / "worker.py"), str(smollm2_gguf), str(tmp_path), PROMPT, str(Path(__file__).parent)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["kernels"] == ["ParallelLinear", "int8pack", "int4_tinygemm"]
        assert torch.allclose(result["logits"], expected, atol=1e-3, rtol=0)


def _free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])
