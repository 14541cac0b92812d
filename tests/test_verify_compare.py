"""verify.compare and verify.report: every `require` line judged, and the reports that show it. Pure."""
from __future__ import annotations

import json
from xml.etree import ElementTree

import pytest
import torch

from lwdsl import ast
from lwdsl.errors import Span
from lwdsl.solution import DeviceMemory, LatencyPrediction, MemoryPrediction, Predicted, QualityPrediction
from lwdsl.verify.compare import compare_predictions, compare_requirements
from lwdsl.verify.records import CheckReport, CheckSettings, Measurements
from lwdsl.verify.report import in_unit, to_json, to_junit, to_markdown

PLAN_TEXT = """plan t {
  model "gguf:m.gguf"
  target { device cpu0 cpu }
  require {
    memory cpu0 <= 150 MiB
    latency token <= 25 ms
    quality perplexity <= +5%
    throughput >= 40 tok/s
    quality kld < 0.05
  }
}
"""


def _constraint(line, name, qualifier, op, value, kind, text, unit="", relative=False):
    return ast.Constraint(span=Span(file="t.lwp", line=line, column=5),
                          metric=ast.Metric(name=name, qualifier=qualifier), op=op,
                          value=ast.Quantity(value=value, kind=kind, text=text, unit=unit, relative=relative))


PLAN = ast.Plan(
    name="t",
    model=ast.ModelBlock(source="gguf:m.gguf", scheme="gguf", location="m.gguf"),
    target=ast.Target(devices=(ast.Device(name="cpu0", kind="cpu"),)),
    require=(
        _constraint(5, "memory", "cpu0", "<=", 150 * 2**20, "size", "150 MiB", "MiB"),
        _constraint(6, "latency", "token", "<=", 0.025, "time", "25 ms", "ms"),
        _constraint(7, "quality", "perplexity", "<=", 0.05, "percent", "+5%", "%", relative=True),
        _constraint(8, "throughput", None, ">=", 40.0, "token_rate", "40 tok/s", "tok/s"),
        _constraint(9, "quality", "kld", "<", 0.05, "number", "0.05"),
    ),
)

PREDICTED = Predicted(
    memory=MemoryPrediction(by_device={"cpu0": DeviceMemory(total_bytes=140 * 2**20)}, total_bytes=140 * 2**20),
    latency=LatencyPrediction(prefill_s=0.5, token_s=0.020, request_s=3.0),
    throughput_tok_s=50.0,
    quality=QualityPrediction(perplexity_increase=0.03, kld=0.02, source="profile"),
)


def _measured(memory_mib=120, token_s=0.018, ppl_increase=0.04, throughput=55.0, kld=0.03):
    return Measurements(memory_bytes={"cpu0": int(memory_mib * 2**20)}, memory_total_bytes=int(memory_mib * 2**20),
                        prefill_s=0.4, token_s=token_s, request_s=2.5, throughput_tok_s=throughput,
                        perplexity=20.0, perplexity_increase=ppl_increase, kld=kld)


def test_all_requirements_hold_with_margins_and_predictions():
    results = compare_requirements(PLAN, PLAN_TEXT, _measured(), PREDICTED, baseline_perplexity=19.2)
    assert [r.line for r in results] == [5, 6, 7, 8, 9]
    assert all(r.passed for r in results)
    memory = results[0]
    assert memory.text == "memory cpu0 <= 150 MiB"
    assert memory.predicted == 140 * 2**20
    assert memory.margin == 30 * 2**20
    assert memory.margin_relative == pytest.approx(0.2)
    assert results[3].margin == pytest.approx(15.0)  # >=: measured above required is headroom
    assert results[2].predicted == pytest.approx(0.03)


@pytest.mark.parametrize("field,value,line", [
    ("memory_mib", 151, 5), ("token_s", 0.0251, 6), ("ppl_increase", 0.0501, 7),
    ("throughput", 39.9, 8), ("kld", 0.05, 9),  # `<` is strict
])
def test_each_requirement_fails_alone_when_missed(field, value, line):
    results = compare_requirements(PLAN, PLAN_TEXT, _measured(**{field: value}), PREDICTED)
    failed = [r.line for r in results if not r.passed]
    assert failed == [line]
    assert results[line - 5].margin < 0 or results[line - 5].margin == 0


def test_unmeasured_device_fails_with_a_note():
    measured = _measured().model_copy(update={"memory_bytes": {}})
    result = compare_requirements(PLAN, PLAN_TEXT, measured)[0]
    assert not result.passed and result.measured is None and "cpu0" in result.note


def test_predictions_report_relative_error():
    errors = {p.metric: p.error_relative for p in compare_predictions(PREDICTED, _measured())}
    assert errors["latency token"] == pytest.approx(0.018 / 0.020 - 1)
    assert errors["memory cpu0"] == pytest.approx(120 / 140 - 1)
    assert compare_predictions(None, _measured()) == []


def _report(measured):
    requirements = compare_requirements(PLAN, PLAN_TEXT, measured, PREDICTED)
    return CheckReport(plan="t", plan_file="plans/t.lwp", plan_hash="abc", passed=all(r.passed for r in requirements),
                       requirements=requirements, predictions=compare_predictions(PREDICTED, measured),
                       measured=measured, baseline=_measured(memory_mib=500, ppl_increase=0.0, kld=0.0),
                       settings=CheckSettings(eval_tokens=510, eval_source="text:python-docs", batch=1,
                                              context=64, generate=16, repeats=3, warmup=1))


def test_json_contract_fields():
    data = json.loads(to_json(_report(_measured(memory_mib=200))))
    assert data["schema_version"] == "lwdsl.check/1"
    assert data["passed"] is False
    first = data["requirements"][0]
    assert {"line", "metric", "required", "predicted", "measured", "passed", "margin"} <= set(first)
    assert first["metric"] == "memory cpu0" and first["passed"] is False
    assert data["baseline"]["memory_bytes"]["cpu0"] == 500 * 2**20


def test_junit_names_the_failing_plan_line():
    xml = to_junit(_report(_measured(token_s=0.040)))
    suite = ElementTree.fromstring(xml.split("\n", 1)[1])
    assert suite.get("tests") == "5" and suite.get("failures") == "1"
    failing = [case for case in suite.iter("testcase") if case.find("failure") is not None]
    assert len(failing) == 1
    assert failing[0].get("name") == "plans/t.lwp:6 latency token <= 25 ms"
    assert failing[0].get("line") == "6"
    assert "plans/t.lwp:6" in failing[0].find("failure").get("message")


def test_markdown_and_units():
    markdown = to_markdown(_report(_measured()))
    assert "PASSED" in markdown and "| 5 | memory cpu0 <= 150 MiB |" in markdown
    assert in_unit(0.0123, "ms") == "12.3 ms"
    assert in_unit(0.05, "%") == "+5.00%"
    assert in_unit(150 * 2**20, "MiB") == "150.0 MiB"
    assert in_unit(None, "ms") == "—"


def test_check_says_when_the_machine_streamed_memory_at_another_rate_than_predicted():
    """A shared machine's bandwidth moves: the report names the rate seen around the timed runs next
    to the one the predictions took, when they differ by more than 10%."""
    from lwdsl.hardware.resolve import resolve_target
    from lwdsl.parse import parse_text
    from lwdsl.verify.gate import _bandwidth_notes

    plan = parse_text('plan t { model "gguf:m.gguf"\n'
                      '  target { device cpu0 cpu { memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS } } }')
    target = resolve_target(plan.target, run_probe=False)
    (note,) = _bandwidth_notes(target, (29e9, 31e9))
    assert "30.0 GB/s around the timed runs" in note and "20.0 GB/s for cpu0" in note
    assert _bandwidth_notes(target, (21e9, 21e9)) == [] and _bandwidth_notes(target, None) == []


def test_the_token_prediction_is_also_set_beside_the_bandwidth_the_run_saw():
    """A decode step on one CPU streams its weights: at half the probe's bandwidth the prediction doubles.
    The row comes beside the plain comparison and only for a single CPU target."""
    from lwdsl.hardware.resolve import resolve_target
    from lwdsl.parse import parse_text
    from lwdsl.verify.gate import _at_measured_bandwidth

    plan = parse_text('plan t { model "gguf:m.gguf"\n'
                      '  target { device cpu0 cpu { memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS } } }')
    target = resolve_target(plan.target, run_probe=False)
    measured = _measured(token_s=0.036).model_copy(update={"token_read_Bps": 10e9})
    (row,) = _at_measured_bandwidth(target, PREDICTED, measured)
    assert row.predicted == pytest.approx(0.040) and row.error_relative == pytest.approx(-0.1)
    assert _at_measured_bandwidth(target, PREDICTED, _measured()) == []  # nothing sampled
    assert _at_measured_bandwidth(None, PREDICTED, measured) == []
    two = parse_text('plan t { model "gguf:m.gguf"\n  target { device cpu0 cpu { memory 8 GiB; bandwidth 20 GB/s; '
                     'compute 100 GFLOPS }\n device gpu0 gpu "rtx-4090" } }')
    assert _at_measured_bandwidth(resolve_target(two.target, run_probe=False), PREDICTED, measured) == []


def test_a_transient_buffer_is_kept_out_of_the_memory_peak():
    """The read-rate samples beside the timed runs allocate and free 128 MiB: the peak the check reports
    keeps what the model held, not the sample's buffer. In a fresh process, as the check's worker (a
    long test process may hand the allocation pages it already holds)."""
    import subprocess
    import sys

    script = """
import json, torch
from lwdsl.verify.memory import PeakMemory
meter = PeakMemory()
held = torch.ones(16 << 20)  # 64 MiB the "model" holds
rate = meter.exclude(lambda: float(torch.ones(64 << 20).sum()))  # 256 MiB, freed inside
print(json.dumps({"resets": meter.resets, "rate": rate, "peak": meter.peaks()["cpu"]}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["resets"]:
        pytest.skip("this OS cannot restart the resident high-water mark")
    assert result["rate"] == 64 << 20
    assert 56 << 20 < result["peak"] < 160 << 20, result


def test_latency_samples_the_read_rate_beside_each_timed_run(monkeypatch):
    """Before each timed run and after the last: each run's rate is the mean of its neighbours (the runs
    themselves replaced by fixed timings: this is the bookkeeping, `test_e2e` times real ones)."""
    import lwdsl.verify.latency as latency

    monkeypatch.setattr(latency, "time_one_run", lambda *a, **k: latency.RunTiming(0.1, (0.01, 0.02, 0.03), "fused"))
    samples = iter([10.0, 20.0, 30.0, 40.0])
    result = latency.measure_latency(torch.nn.Module(), torch.zeros(1, 4, dtype=torch.long), 4, repeats=3,
                                     warmup=1, read_rate=lambda: next(samples))
    assert result.read_Bps == 25.0 and result.token_s == 0.02  # means 15, 25, 35
    assert next(samples, None) is None  # one sample before each run and one after the last
