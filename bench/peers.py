"""Where the benchmarks' peers live: the benchmark venv with llama-cpp-python and torchao, never a
dependency of lwdsl. `bash bench/setup_peers.sh` builds it as bench/.venv."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP_HINT = "run `bash bench/setup_peers.sh`"


def bench_python() -> Path:
    """The benchmark venv's Python: `$LWDSL_BENCH_PYTHON`, else bench/.venv, else a hand-made
    `.venv-bench` in the checkout or beside it; the bench/.venv path (absent) when none exists."""
    candidates = (os.environ.get("LWDSL_BENCH_PYTHON"), ROOT / "bench" / ".venv" / "bin" / "python",
                  ROOT / ".venv-bench" / "bin" / "python", ROOT.parent / ".venv-bench" / "bin" / "python")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return ROOT / "bench" / ".venv" / "bin" / "python"
