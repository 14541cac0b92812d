"""Metrics say what they measure: `latency` needs a phase, a `require` on `quality` needs a measure
(E270)."""
from __future__ import annotations

from lwdsl import ast
from lwdsl.errors import Diagnostic
from lwdsl.semantics.context import Context, error


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    objective_metrics = [term.metric for term in plan.objective.terms] if plan.objective else []
    for metric in [c.metric for c in plan.require] + objective_metrics:
        if metric.name == "latency" and metric.qualifier is None:
            found.append(error("E270", "`latency` needs a phase: `token`, `prefill` or `request`", metric.span,
                               "e.g. `latency token <= 25 ms`"))
    for constraint in plan.require:
        if constraint.metric.name == "quality" and constraint.metric.qualifier is None:
            found.append(error("E270", "`quality` needs a measure: `perplexity` or `kld`", constraint.metric.span,
                               "e.g. `quality perplexity <= +5%`"))
    return found
