"""Values in range: sizes, rates and counts positive, percentages within bounds, ZeRO stages 0..3 (E221)."""
from __future__ import annotations

import math

from lwdsl import ast
from lwdsl.errors import Diagnostic
from lwdsl.semantics.context import Context, error, walk_techniques


def _positive(quantity: ast.Quantity | None, place: str, allow_zero: bool = False) -> list[Diagnostic]:
    if quantity is None:
        return []
    if not math.isfinite(quantity.value):
        return [error("E221", f"{place} must be a finite number, found `{quantity.text}`", quantity.span)]
    if quantity.value < 0 or (quantity.value == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        return [error("E221", f"{place} must be {bound}, found `{quantity.text}`", quantity.span)]
    return []


def _count(value: int | None, place: str, span, low: int = 1, high: int | None = None) -> list[Diagnostic]:
    if value is None or (value >= low and (high is None or value <= high)):
        return []
    bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
    return [error("E221", f"{place} must be {bounds}, found {value}", span)]


def _technique(technique) -> list[Diagnostic]:
    span = technique.span
    if isinstance(technique, ast.Prune) and technique.up_to is not None:
        found = _positive(technique.up_to, f"`prune {technique.kind} up to`")
        if not found and technique.up_to.kind == "percent" and technique.up_to.value >= 1:
            found.append(error("E221", f"`prune {technique.kind} up to` must be below 100%, found "
                                       f"`{technique.up_to.text}`", technique.up_to.span, "pruning everything leaves no model"))
        return found
    if isinstance(technique, (ast.QuantizeWeights, ast.QuantizeKV)):
        return [d for f in technique.formats for d in _count(f.group, "a group size", f.span)]
    if isinstance(technique, ast.Shard) and technique.up_to is not None:
        return _count(technique.up_to, f"`shard {technique.kind} up to`", span)
    if isinstance(technique, ast.Accumulate):
        return _count(technique.up_to, "`accumulate up to`", span)
    if isinstance(technique, ast.Zero):
        found = _count(technique.low, "a ZeRO stage", span, 0, 3) + _count(technique.high, "a ZeRO stage", span, 0, 3)
        if not found and technique.low > technique.high:
            found.append(error("E221", f"`zero {technique.low}..{technique.high}` is an empty range", span,
                               "write the lower stage first, e.g. `zero 0..3`"))
        return found
    return []


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    for device in plan.target.devices:
        for prop in ("memory", "bandwidth", "compute"):
            found += _positive(getattr(device, prop), f"`{prop}` of device `{device.name}`")
        found += _positive(device.price, f"`price` of device `{device.name}`", allow_zero=True)
    for link in plan.target.links:
        found += _positive(link.rate, "a link's rate") + _positive(link.latency, "a link's latency", allow_zero=True)
    for constraint in plan.require:
        zero_ok = constraint.metric.name in ("quality", "cost")
        if constraint.value.kind == "percent" and constraint.value.value < 0 and constraint.metric.name == "quality":
            found.append(error("E221", f"a quality bound must be zero or more, found `{constraint.value.text}`",
                               constraint.value.span, "a lighter model never gets better than the original"))
        elif constraint.value.kind != "percent":
            found += _positive(constraint.value, f"the bound of `{constraint.metric.name}`", allow_zero=zero_ok)
    workload = plan.workload
    fields = ("batch", "context", "generate") if workload.type == "inference" else ("batch", "sequence", "tokens")
    for field in fields:
        if field == "tokens" and workload.tokens == 0:
            continue  # not given: only `time` needs it (lwdsl.semantics.workload)
        found += _count(getattr(workload, field), f"`{field}`", workload.span)
    for source in (plan.model.eval, plan.model.calibrate):
        if source is not None:
            found += _count(source.tokens, "`tokens`", source.span)
    for technique, _ in walk_techniques(plan.allow.techniques):
        found += _technique(technique)
    return found
