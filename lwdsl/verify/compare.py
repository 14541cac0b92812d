"""Every `require` line against what was measured (and what the solver predicted). Pure.

    >>> results = compare_requirements(plan, plan_text, measured, predicted)   # doctest: +SKIP
    >>> [r.passed for r in results]                                             # doctest: +SKIP
    [True, True, False]
"""
from __future__ import annotations

import operator

from lwdsl import ast
from lwdsl.solution import Predicted
from lwdsl.verify.records import Measurements, PredictionResult, RequirementResult

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


def metric_name(metric: ast.Metric) -> str:
    return f"{metric.name} {metric.qualifier}" if metric.qualifier else metric.name


def _quality_is_relative(constraint: ast.Constraint) -> bool:
    return constraint.value.relative or constraint.value.kind == "percent"


def measured_value(constraint: ast.Constraint, measured: Measurements) -> tuple[float | None, str | None]:
    """The measured figure a constraint speaks about, in its base unit, or None and why."""
    metric = constraint.metric
    if metric.name == "memory":
        if metric.qualifier is None:
            return measured.memory_total_bytes, None
        value = measured.memory_bytes.get(metric.qualifier)
        return value, None if value is not None else f"no measurement for device {metric.qualifier!r}"
    if metric.name == "latency":
        phase = metric.qualifier or "token"
        return {"token": measured.token_s, "prefill": measured.prefill_s,
                "request": measured.request_s}.get(phase), None
    if metric.name == "throughput":
        return measured.throughput_tok_s, None
    if metric.name == "quality":
        if metric.qualifier == "kld":
            return measured.kld, None
        if _quality_is_relative(constraint):
            return measured.perplexity_increase, None
        return measured.perplexity, None
    if metric.name == "cost":
        return measured.cost_per_h, "the price of the devices used, from the plan"
    if metric.name == "time":
        return measured.training_time_s, "the whole run: its steps x the median step measured by `lwdsl train`"
    return None, f"`{metric_name(metric)}` is not measured by `check`"


def predicted_value(constraint: ast.Constraint, predicted: Predicted | None,
                    baseline_perplexity: float | None = None) -> float | None:
    if predicted is None:
        return None
    metric = constraint.metric
    if metric.name == "memory":
        if metric.qualifier is None:
            return float(predicted.memory.total_bytes) if predicted.memory.total_bytes else None
        device = predicted.memory.by_device.get(metric.qualifier)
        return float(device.total_bytes) if device else None
    if metric.name == "latency":
        latency = predicted.latency
        return {"token": latency.token_s, "prefill": latency.prefill_s,
                "request": latency.request_s}.get(metric.qualifier or "token")
    if metric.name == "throughput":
        return predicted.throughput_tok_s
    if metric.name == "quality":
        if metric.qualifier == "kld":
            return predicted.quality.kld
        if _quality_is_relative(constraint):
            return predicted.quality.perplexity_increase
        if baseline_perplexity is not None:
            return baseline_perplexity * (1.0 + predicted.quality.perplexity_increase)
        return None
    if metric.name == "cost":
        return predicted.cost_per_h
    if metric.name == "time":
        return predicted.training.time_s if predicted.training else None
    return None


def _margin(op: str, required: float, measured: float) -> float:
    return required - measured if op in ("<=", "<") else measured - required


def source_line(text: str, line: int) -> str:
    lines = text.splitlines()
    return lines[line - 1].split("#", 1)[0].strip().rstrip(";") if 1 <= line <= len(lines) else ""


def compare_requirements(plan: ast.Plan, plan_text: str, measured: Measurements,
                         predicted: Predicted | None = None,
                         baseline_perplexity: float | None = None) -> list[RequirementResult]:
    """One result per `require` line, in plan order; a figure that could not be measured fails."""
    results = []
    for constraint in plan.require:
        value, note = measured_value(constraint, measured)
        required = constraint.value.value
        passed = value is not None and _OPS[constraint.op](value, required)
        margin = _margin(constraint.op, required, value) if value is not None else None
        unit = "%" if constraint.value.kind == "percent" else constraint.value.unit
        results.append(RequirementResult(
            line=constraint.span.line,
            text=source_line(plan_text, constraint.span.line) or
            f"{metric_name(constraint.metric)} {constraint.op} {constraint.value.text}",
            metric=metric_name(constraint.metric),
            op=constraint.op,
            required=required,
            unit=unit,
            predicted=predicted_value(constraint, predicted, baseline_perplexity),
            measured=value,
            margin=margin,
            margin_relative=(margin / abs(required)) if margin is not None and required else None,
            passed=bool(passed),
            note=note,
        ))
    return results


def compare_predictions(predicted: Predicted | None, measured: Measurements) -> list[PredictionResult]:
    """Each prediction the solver made next to its measurement (the cost model's report card)."""
    if predicted is None:
        return []
    pairs: list[tuple[str, float | None, float | None]] = [
        (f"memory {name}", float(device.total_bytes), measured.memory_bytes.get(name))
        for name, device in sorted(predicted.memory.by_device.items())
    ]
    pairs += [
        ("memory", float(predicted.memory.total_bytes), measured.memory_total_bytes),
        ("latency prefill", predicted.latency.prefill_s, measured.prefill_s),
        ("latency token", predicted.latency.token_s, measured.token_s),
        ("latency request", predicted.latency.request_s, measured.request_s),
        ("throughput", predicted.throughput_tok_s, measured.throughput_tok_s),
        ("quality perplexity", predicted.quality.perplexity_increase, measured.perplexity_increase),
        ("quality kld", predicted.quality.kld, measured.kld),
    ]
    results = []
    for metric, guess, value in pairs:
        if guess is None or value is None or guess == 0:
            continue
        results.append(PredictionResult(metric=metric, predicted=guess, measured=float(value),
                                        error_relative=(float(value) - guess) / abs(guess)))
    return results
