"""Units fit their place: a size where a size belongs, a time where a time belongs (E220).

    "expected a size such as `8 GiB`, found `20 ms`"
"""
from __future__ import annotations

from lwdsl import ast
from lwdsl.errors import Diagnostic
from lwdsl.semantics.context import Context, error, walk_techniques
from lwdsl.units import KIND_WORDS

DEVICE_PROPERTIES = {"memory": "size", "bandwidth": "bandwidth", "compute": "compute", "price": "money"}

# The quantity kind each metric is measured in (`quality` depends on its measure).
METRIC_KINDS = {"memory": "size", "latency": "time", "throughput": "token_rate", "cost": "money", "time": "time",
                ("quality", "perplexity"): "percent", ("quality", "kld"): "number"}


TYPICAL_UNIT = {"size": "GiB", "bandwidth": "GB/s", "compute": "TFLOPS", "time": "ms", "token_rate": "tok/s",
                "money": "$/h", "percent": "%"}


def expect(quantity: ast.Quantity, kind: str, place: str) -> list[Diagnostic]:
    if quantity.kind == kind:
        return []
    hint = None
    if quantity.kind == "number" and kind != "number":
        unit = TYPICAL_UNIT[kind]
        hint = f"add a unit: `{quantity.text}{unit}`" if unit == "%" else f"add a unit: `{quantity.text} {unit}`"
    return [error("E220", f"expected {KIND_WORDS[kind]} for {place}, found `{quantity.text}`", quantity.span, hint)]


def metric_kind(metric: ast.Metric) -> str | None:
    if metric.name == "quality":
        return METRIC_KINDS.get(("quality", metric.qualifier or ""))
    return METRIC_KINDS[metric.name]


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    for device in plan.target.devices:
        for prop, kind in DEVICE_PROPERTIES.items():
            value = getattr(device, prop)
            if value is not None:
                found += expect(value, kind, f"`{prop}` of device `{device.name}`")
    for link in plan.target.links:
        found += expect(link.rate, "bandwidth", f"the rate of link `{link.a} <-> {link.b}`")
        if link.latency is not None:
            found += expect(link.latency, "time", "a link's latency")
    for constraint in plan.require:
        kind = metric_kind(constraint.metric)
        if kind is not None:
            found += expect(constraint.value, kind, f"`{_metric_text(constraint.metric)}`")
    for technique, _ in walk_techniques(plan.allow.techniques):
        if isinstance(technique, ast.Prune) and technique.up_to is not None:
            found += expect(technique.up_to, "percent", f"`prune {technique.kind} up to`")
    return found


def _metric_text(metric: ast.Metric) -> str:
    return f"{metric.name} {metric.qualifier}" if metric.qualifier else metric.name
