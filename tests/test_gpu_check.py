"""bench/gpu_check.py, the prepared GPU check: without a CUDA device it skips cleanly (exit 0); its
steps run here on the CPU (`--cpu-dry-run`): the card measured, a random-weight catalog model through
the serving executor in bf16, int8 and int4 against `lwdsl estimate`, and plain torch beside it; one
SmolLM2 format through `lwdsl apply` -> `run` -> `check`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.model


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_card_it_skips_cleanly():
    done = _run()
    assert done.returncode == 0 and done.stdout.strip() == "skipped: no CUDA device", done.stderr[-2000:]


def test_the_big_model_and_plain_torch_run_on_the_cpu():
    done = _run("--cpu-dry-run", "--skip-smollm2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("smollm2-135m (random)")]
    assert len(rows) == 4  # bf16, int8, int4 through the executor, then plain torch
    assert "eager serving step on cpu" in rows[0] and "plain torch" in rows[3]


@pytest.mark.slow
def test_smollm2_goes_through_apply_run_and_check():
    done = _run("--cpu-dry-run", "--skip-big", "--formats", "int4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("SmolLM2-135M"))
    assert "int4" in row and "eager serving step on cpu" in row
