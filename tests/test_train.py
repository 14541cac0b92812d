"""`lwdsl train`: real gloo ranks on a tiny Llama (the real tokenizer): a run killed in the middle
resumes from its last checkpoint and ends where an uninterrupted run ends; the JSON contract; bad
input. The ZeRO mapping itself: tests/test_train_zero.py. SmolLM2 figures: docs/BENCHMARKS.md."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAN = """plan tiny_train {{
  model "hf:{model}" {{ calibrate "text:python-docs" }}
  target {{
    device r0 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
    device r1 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
  }}
  workload training {{ batch 4; sequence 32; tokens 1024; optimizer adamw; precision fp32 }}
  allow {{ zero 0..3; shard data up to 2 }}
}}
"""


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory, smollm2_gguf) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lwdsl import ast
    from lwdsl.models.load import cached_hf_folder

    real = cached_hf_folder(ast.ModelBlock(source=f"gguf:{smollm2_gguf}", scheme="gguf",
                                           location=str(smollm2_gguf)), smollm2_gguf.parent)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in os.listdir(real):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(real / name, folder / name)
    plan = folder.parent / "tiny.lwp"
    plan.write_text(PLAN.format(model=folder))
    return plan


def _train(plan: Path, out: Path, *extra: str, steps: int = 8, **popen) -> subprocess.Popen:
    extra = ("--with", "data=2", *extra)
    command = [sys.executable, "-m", "lwdsl", "train", str(plan), "--steps", str(steps), "-o", str(out),
               "--checkpoint-every", "2", "--lr", "1e-3", "--json", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_loss(tiny_plan, tmp_path):
    whole = _finish(_train(tiny_plan, tmp_path / "whole", "--with", "zero=3"))
    assert whole["schema_version"] == "lwdsl.train/1" and whole["steps"] == 8 and whole["ranks"] == 2
    assert whole["zero_stage"] == 3 and len(whole["loss"]) == 8
    for section in ("measured", "predicted"):
        assert {"peak_memory_bytes", "step_s", "tokens_per_s"} <= set(whole[section])
        assert whole[section]["peak_memory_bytes"] > 0 and whole[section]["step_s"] > 0
    assert whole["loss"][-1] < whole["loss"][0]  # it learns

    out = tmp_path / "killed"
    victim = _train(tiny_plan, out, "--with", "zero=3", start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        pointer = out / "latest.json"
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 2:
            break
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and its ranks, mid-run
    victim.communicate()
    reached = json.loads((out / "latest.json").read_text())["step"]
    assert 2 <= reached < 8, f"the run was not killed in the middle (checkpoint at step {reached})"
    assert not list(out.glob("checkpoint-*/*.partial*"))

    resumed = _finish(_train(tiny_plan, out, "--with", "zero=3"))
    assert resumed["resumed_from"] == reached and resumed["steps"] == 8
    assert resumed["loss"][:reached] == whole["loss"][:reached]
    assert resumed["loss"][-1] == pytest.approx(whole["loss"][-1], rel=0.01)


def test_resume_refuses_another_runs_checkpoint(tiny_plan, tmp_path):
    from lwdsl.errors import LwdslError
    from lwdsl.plans import load_plan
    from lwdsl.train import _check_resume, run_config

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-000002").mkdir()
    (out / "checkpoint-000002" / "state.json").write_text(json.dumps({"fingerprint": {"model_dir": "other"}}))
    (out / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-000002", "step": 2}))
    config, _, _ = run_config(load_plan(tiny_plan), out, steps=2)
    with pytest.raises(LwdslError) as raised:
        _check_resume(config)
    assert raised.value.diagnostics[0].code == "E806"


def test_train_refuses_an_inference_plan(repo_root):
    done = subprocess.run([sys.executable, "-m", "lwdsl", "train", str(repo_root / "plans/smollm2_edge.lwp")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "E801" in done.stderr and "Traceback" not in done.stderr


def test_run_config_follows_the_solution(tiny_plan, tmp_path):
    from lwdsl.plans import load_plan
    from lwdsl.train import run_config

    config, tokens, settings = run_config(load_plan(tiny_plan), tmp_path, steps=3,
                                          overrides={"zero_stage": 2, "accumulate": 2})
    assert config.zero_stage == 2 and config.accumulate == 2 and config.ranks == settings["data_parallel"]
    assert config.micro_batch * config.ranks * config.accumulate >= 4 and len(tokens) >= 32


@pytest.mark.slow
def test_check_gates_a_training_plan(tiny_plan, tmp_path):
    from lwdsl.errors import LwdslError
    from lwdsl.verify.gate import check

    plan = tmp_path / "gated.lwp"
    plan.write_text(tiny_plan.read_text().replace(
        "  allow {", "  require { memory r0 <= 4 GiB; time <= 10 h }\n  allow {"))
    report = check(plan)
    fits, quick = report.requirements
    assert fits.passed and fits.measured > 0 and fits.predicted > 0
    assert quick.metric == "time" and quick.measured == pytest.approx(report.measured.step_s * 8)
    assert report.passed and report.measured.step_s > 0
    assert any(p.metric == "step time" for p in report.predictions)
    impossible = tmp_path / "impossible.lwp"
    impossible.write_text(tiny_plan.read_text().replace("  allow {", "  require { memory r0 <= 1 MiB }\n  allow {"))
    with pytest.raises(LwdslError) as raised:  # no settings fit: the gate fails before running (exit 1)
        check(impossible)
    assert raised.value.diagnostics[0].code == "E804" and raised.value.exit_code == 1
