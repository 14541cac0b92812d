"""`lwdsl estimate` and `lwdsl probe`: settings, the JSON contract, the tables, training plans."""
from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from lwdsl.errors import LwdslError
from lwdsl.estimate import estimate, parse_format, parse_settings
from lwdsl.estimate_view import render
from lwdsl.parse import parse_text
from lwdsl.solution import PruneChoice, QuantFormat

INFERENCE = """
plan edge {
  model "arch:smollm2-135m"
  target {
    device cpu0 cpu { memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS; price 0.05 $/h }
    device ssd disk { memory 256 GiB; bandwidth 2 GB/s }
  }
  workload inference { batch 2; context 256; generate 32 }
  allow { keep lm_head, "model.layers.0.*" }
}
"""

TRAINING = """
plan train {
  model "arch:llama-3.1-8b"
  target { device g0 gpu "h100-sxm"; device g1 gpu "h100-sxm"; device host cpu { memory 1 TiB; bandwidth 100 GB/s; compute 1 TFLOPS } }
  workload training { batch 16; sequence 4096; tokens 1_000_000_000; optimizer adamw; precision bf16 }
}
"""


def test_settings_parse_the_plan_format_syntax():
    assert parse_format("int4 group 128 asymmetric") == QuantFormat(dtype="int4", group=128, symmetric=False)
    assert parse_format("nf4  group 64") == QuantFormat(dtype="nf4", group=64)
    settings = parse_settings(["weights=int4 group 32", "kv=int8", "prune=channels 25%", "zero=2", "checkpoint"])
    assert settings.weights.group == 32 and settings.kv.dtype == "int8" and settings.zero == 2
    assert settings.prune == PruneChoice(kind="channels", fraction=0.25) and settings.checkpoint
    for bad in (["weights=int5"], ["speed=fast"], ["zero=7"], ["prune=channels lots"]):
        with pytest.raises(LwdslError) as error:
            parse_settings(bad)
        assert error.value.diagnostics[0].code == "E410"


def test_estimate_json_contract_and_with_settings(tmp_path):
    plan = parse_text(INFERENCE)
    report = estimate(plan, tmp_path, parse_settings(["weights=int4 group 64", "kv=int8"]))
    data = json.loads(report.model_dump_json())
    assert data["model"]["params"] == 134_515_008 and data["model"]["layers"] == 30
    for key in ("weights_bytes", "kv_cache_bytes", "activations_bytes", "total_bytes"):
        assert isinstance(data["memory"][key], int)
    assert data["memory"]["by_device"]["cpu0"]["total_bytes"] == data["memory"]["total_bytes"]
    assert data["memory"]["by_device"]["ssd"]["total_bytes"] == 0
    assert data["latency"]["prefill_s"] > 0 and data["latency"]["token_s"] > 0
    assert data["throughput_tok_s"] == pytest.approx(2 / data["latency"]["token_s"])
    assert data["training"] is None and data["cost_per_h"] == 0.05
    baseline = data["baseline"]
    assert baseline["settings"] == {} and baseline["baseline"] is None
    assert data["memory"]["weights_bytes"] < baseline["memory"]["weights_bytes"]
    # KV: 2·30·3·64 values a token; fp32 4 bytes vs int8 1 byte + one fp16 scale a head vector
    assert baseline["memory"]["kv_cache_bytes"] == 2 * (256 + 32) * 2 * 30 * 3 * 64 * 4
    assert data["memory"]["kv_cache_bytes"] == 2 * (256 + 32) * 2 * 30 * 3 * (64 + 2)
    assert data["latency"]["token_s"] < baseline["latency"]["token_s"]
    assert data["quality"]["perplexity_increase"] > 0 == baseline["quality"]["perplexity_increase"]


def test_keep_and_layers_a_format_cannot_fit_are_reported(tmp_path):
    report = estimate(parse_text(INFERENCE), tmp_path, parse_settings(["weights=int4 group 128"]))
    assert any("q_proj left as it was: group 128 does not divide the input dimension 576 (29 layers)" in n
               for n in report.notes)  # layer 0 is kept, so 29 not 30
    assert not any("down_proj" in n for n in report.notes)
    untouched = estimate(parse_text(INFERENCE), tmp_path, parse_settings(["weights=int8"]))
    saved = untouched.baseline.memory["weights_bytes"] - untouched.memory["weights_bytes"]
    # every linear of blocks 1..29 goes bf16 (SmolLM2's checkpoint) -> int8 (+ an fp16 scale a row);
    # layer 0 and lm_head kept
    per_block = (576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3)
    rows = 576 * 2 + 192 * 2 + 1536 * 2 + 576
    assert saved == 29 * (per_block * 1 - rows * 2)


def test_training_estimate(tmp_path):
    plan = parse_text(TRAINING)
    report = estimate(plan, tmp_path, parse_settings(["zero=3", "data=2", "checkpoint"]))
    training = report.training
    params = 8_030_261_248
    assert training["model_states_bytes"] == 16 * params // 2 and training["zero_stage"] == 3
    assert training["flops"] == 8 * params * 1_000_000_000
    assert training["time_s"] == pytest.approx(training["flops"] / (2 * 989.5e12 * 0.4))
    stages = [s["model_states_bytes"] for s in training["by_zero_stage"]]
    assert stages == sorted(stages, reverse=True) and stages[0] == 16 * params
    assert report.baseline.training["zero_stage"] == 0 and report.baseline.training["flops"] == 6 * params * 10**9
    assert set(report.memory["by_device"]) == {"g0", "g1", "host"}
    assert report.memory["by_device"]["host"]["total_bytes"] == 0


def test_tables_render(tmp_path):
    console = Console(file=io.StringIO(), width=200)
    render(estimate(parse_text(INFERENCE), tmp_path, parse_settings(["weights=int8"])), console)
    render(estimate(parse_text(TRAINING), tmp_path, parse_settings(["zero=1"])), console)
    text = console.file.getvalue()
    assert "Memory by device" in text and "Time by phase" in text and "ZeRO stage" in text
    assert "with weights=int8" in text


def test_probe_prints_a_device_block_the_parser_reads():
    from lwdsl.commands.probe import device_block

    figures = {"kind": "cpu", "memory_bytes": 25_276_502_016, "bandwidth_Bps": 21.8e9, "rates": {"fp32": 5.46e10}}
    block = device_block(figures)
    plan = parse_text(f'plan p {{ model "arch:gpt2" target {{ {block} }} }}')
    device = plan.target.devices[0]
    assert device.catalog == "local" and device.bandwidth.value == pytest.approx(21.8e9)
    assert device.memory.value == pytest.approx(25_276_502_016, rel=1e-3)
    assert device.compute.value == pytest.approx(5.46e10)


def test_cli_estimate_json_and_bad_input(tmp_path, capsys):
    from lwdsl.cli import main

    plan = tmp_path / "edge.lwp"
    plan.write_text(INFERENCE)
    assert main(["estimate", str(plan), "--json", "--with", "weights=int8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["params"] == 134_515_008 and data["baseline"]["settings"] == {}
    assert main(["estimate", str(plan), "--with", "weights=int9"]) == 2
    assert "E410" in capsys.readouterr().err
    assert main(["estimate", str(tmp_path / "missing.lwp")]) == 2
    assert main(["estimate", str(plan)]) == 0
    assert "Memory by device" in capsys.readouterr().out


def test_unstructured_pruning_says_it_saves_no_bytes(tmp_path):
    report = estimate(parse_text(INFERENCE), tmp_path, parse_settings(["prune=unstructured 50%"]))
    assert report.memory["weights_bytes"] == report.baseline.memory["weights_bytes"]
    assert any("stored dense: it saves no bytes" in note for note in report.notes)
