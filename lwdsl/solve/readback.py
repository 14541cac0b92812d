"""An Assignment back into plain records: layer choices, stages, requirement margins, needed values."""
from __future__ import annotations

import re

from lwdsl import ast
from lwdsl.hardware.records import ResolvedTarget
from lwdsl.solution import LayerChoice, Predicted, QuantFormat
from lwdsl.solve.aggregate import expand
from lwdsl.solve.problem import Counts, Problem, Requirement
from lwdsl.units import UNITS

TIGHT = 0.02  # a requirement within 2% of its bound is reported as binding


def layer_choices(problem: Problem, counts: Counts, blocks: dict[str, int | None]) -> list[LayerChoice]:
    """One LayerChoice per original layer (aggregated units expanded), in the problem's layer order."""
    unit_place, picks = expand(problem, counts)
    choices = []
    for layer in problem.layers:
        unit = problem.units[layer.unit]
        for name in layer.names or (layer.name,):
            o, p = picks[name]
            place = unit.places[p]
            fmt, prune = layer.options[o].payload
            kept = layer.note == "kept as it is"
            choices.append(LayerChoice(name=name, block=blocks.get(name), format=fmt, prune=prune,
                                       device=place.storage, compute_device=place.compute, kept=kept,
                                       note=None if kept else layer.note))
    order = {name: i for i, name in enumerate(blocks)}
    return sorted(choices, key=lambda c: order.get(c.name, len(order)))


def mark_loaded(choices: list[LayerChoice], inventory) -> list[LayerChoice]:
    """Layers left as loaded that hold the checkpoint's own dtype (an `arch:` model's bf16) say so."""
    from lwdsl.cost.terms import as_loaded

    marked = []
    for choice in choices:
        held = as_loaded(inventory.weight(choice.name)).dtype if choice.format == QuantFormat() else "fp32"
        marked.append(choice.model_copy(update={"loaded_as": held}) if held != "fp32" else choice)
    return marked


def stages(problem: Problem, counts: Counts, layers: int) -> list[str]:
    """The compute device of each block, in block order."""
    unit_place, _ = expand(problem, counts)
    by_name = {}
    for unit in problem.units:
        for name in unit.members or (unit.name,):
            by_name[name] = unit
    return [by_name[f"block {b}"].places[unit_place[f"block {b}"]].compute for b in range(layers)
            if f"block {b}" in by_name]


def devices_used(predicted: Predicted, target: ResolvedTarget) -> list[str]:
    return [name for name in target.devices if name in predicted.memory.by_device]


def notes(problem: Problem) -> list[str]:
    """Per-layer notes, grouped: `model.layers.*.self_attn.q_proj: ...` once with a count."""
    counts: dict[str, int] = {}
    for layer in problem.layers:
        if layer.note and layer.note != "kept as it is":
            key = re.sub(r"\.\d+\.", ".*.", layer.name, count=1) + ": " + layer.note
            counts[key] = counts.get(key, 0) + 1
    return [f"{k} ({n} layers)" if n > 1 else k for k, n in counts.items()]


def metric_text(metric: str) -> str:
    """`memory:gpu0` -> `memory gpu0`, `latency:token` -> `latency token`."""
    return metric.replace(":", " ")


def predicted_value(plan: ast.Plan, metric: str, predicted: Predicted) -> float | None:
    """The predicted figure of a problem metric, in base units (bytes, seconds, ratio, $/h)."""
    head, _, tail = metric.partition(":")
    if head == "memory":
        if not tail:
            return float(predicted.memory.total_bytes)
        held = predicted.memory.by_device.get(tail)
        return float(held.total_bytes) if held else 0.0
    if head == "latency":
        return getattr(predicted.latency, f"{tail}_s", None)
    if head == "quality":
        return predicted.quality.perplexity_increase if tail == "perplexity" else predicted.quality.kld
    if head == "cost":
        return predicted.cost_per_h
    if head == "time":
        return predicted.training.time_s if predicted.training else None
    return None


def _constraint_value(plan: ast.Plan, constraint: ast.Constraint, predicted: Predicted) -> float | None:
    if constraint.metric.name == "throughput":
        return predicted.throughput_tok_s
    from lwdsl.solve.build import metric_key

    return predicted_value(plan, metric_key(constraint.metric)[0], predicted)


def requirement_checks(plan: ast.Plan, problem: Problem, predicted: Predicted) -> list[dict]:
    """Each `require` line: required, predicted, margin (fraction of the bound), holds, binding."""
    checks = []
    for constraint in plan.require:
        value = _constraint_value(plan, constraint, predicted)
        bound = constraint.value.value
        if constraint.metric.name == "quality" and constraint.metric.qualifier in (None, "perplexity") \
                and not constraint.value.relative and constraint.value.kind != "percent":
            bound = None  # absolute perplexity: compared by `check` against the measured baseline
        margin = None
        holds = None
        if value is not None and bound is not None:
            upper = constraint.op in ("<=", "<")
            margin = ((bound - value) if upper else (value - bound)) / abs(bound) if bound else (
                -value if upper else value)
            holds = (value <= bound if constraint.op == "<=" else value < bound if constraint.op == "<"
                     else value >= bound if constraint.op == ">=" else value > bound)
        checks.append({"line": constraint.span.line, "metric": metric_text(_metric_label(constraint.metric)),
                       "op": constraint.op, "required": constraint.value.text, "required_value": bound,
                       "predicted": value, "margin": margin, "holds": holds,
                       "binding": margin is not None and 0 <= margin <= TIGHT + _planned_margin(constraint)})
    return checks


def _planned_margin(constraint: ast.Constraint) -> float:
    """How far below its bound (a fraction of it) the solver plans a line (`build.planned_bound`)."""
    if constraint.op not in ("<=", "<") or constraint.metric.name not in ("memory", "quality"):
        return 0.0
    from lwdsl.solve.build import metric_key, planned_bound

    bound = constraint.value.value
    if not bound or (constraint.metric.name == "quality" and not constraint.value.relative
                     and constraint.value.kind != "percent" and constraint.metric.qualifier != "kld"):
        return 0.0  # an absolute perplexity: compared with the measured baseline
    return 1.0 - planned_bound(metric_key(constraint.metric)[0], bound) / bound


def _metric_label(metric: ast.Metric) -> str:
    return metric.name + (f" {metric.qualifier}" if metric.qualifier else "")


def format_in_unit(value: float, unit: str, kind: str) -> str:
    """`value` (base units) written in the plan's unit: 212 MiB, 31.2 ms, +7.3%."""
    if kind == "percent" or unit == "%":
        return f"+{value * 100:.3g}%" if value >= 0 else f"{value * 100:.3g}%"
    factor = UNITS[unit].factor if unit in UNITS else 1.0
    number = value / factor
    text = f"{number:.4g}" if abs(number) < 1e6 else f"{number:.0f}"
    return f"{text} {unit}".strip()


def needed_text(plan: ast.Plan, requirement: Requirement, needed: int | None, members: int = 1) -> str | None:
    """The value a conflicting line would have to move to, written as the line is: rounded on the safe
    side (a `<=` bound up, a `>=` bound down) so that the line written with it is still feasible, in a
    smaller unit of the same kind when the line's own would print a tiny number."""
    constraint = next((c for c in plan.require if c.span.line == requirement.line
                       and c.span.column == (requirement.column or c.span.column)), None)
    from lwdsl.solve.build import from_units

    if needed is None:
        return None
    strict = constraint is not None and constraint.op in ("<", ">")  # `<`: the bound must lie past the value
    value = from_units(requirement.metric, needed + (0.5 if requirement.op == "<=" else -0.5) * strict)
    if constraint is None or requirement.kind == "capacity":  # a device's capacity
        device = requirement.metric.partition(":")[2]
        node = next((d for d in plan.target.devices if d.name == device), None)
        unit = node.memory.unit if node is not None and node.memory is not None else "GiB"
        where = f"each of the {members} devices of line {requirement.line}" if members > 1 else device
        return f"memory {safe_value_text(value, unit, 'size', 'up')} on {where}"
    text = _line_label(requirement, constraint)
    if constraint.op in ("<=", "<") and requirement.kind != "capacity":  # the line's bound is planned lower
        from lwdsl.solve.build import planned_bound

        value = planned_bound(requirement.metric, value, inverse=True)
    if constraint.metric.name == "throughput":
        rate = plan.workload.batch / value if value > 0 else float("inf")
        return f"{text} {constraint.op} {safe_value_text(rate, constraint.value.unit or 'tok/s', 'token_rate', 'down')}"
    direction = "up" if requirement.op == "<=" else "down"
    return f"{text} {constraint.op} {safe_value_text(value, constraint.value.unit, constraint.value.kind, direction)}"


def _line_label(requirement: Requirement, constraint: ast.Constraint) -> str:
    """The metric as the line writes it (`memory gpu[*]`, not one of the devices it stands for)."""
    pattern = (rf"\b{constraint.metric.name}(\s+[A-Za-z_][\w\[\]\.\*]*)?\s*{re.escape(constraint.op)}\s*"
               rf"{re.escape(constraint.value.text)}")
    found = re.search(pattern, requirement.text)
    return found.group(0).rsplit(constraint.op, 1)[0].strip() if found else _metric_label(constraint.metric)


_SMALLER_UNITS = {"size": (("TiB", "GiB", "MiB", "KiB", "B"), ("TB", "GB", "MB", "KB", "B")),
                  "time": (("h", "min", "s", "ms", "us", "ns"),)}


def safe_value_text(value: float, unit: str, kind: str, direction: str) -> str:
    """`value` (base units) in `unit`, at 4 significant digits rounded `up` or `down` (never to the
    unsafe side), switching to a smaller unit of the same family when the number would be below 0.1."""
    import math

    if kind == "percent" or unit == "%":
        number, unit_text = value * 100, "%"
    else:
        for family in _SMALLER_UNITS.get(kind, ()):
            if unit in family and 0 < abs(value) < 0.1 * UNITS[unit].factor:
                unit = next((u for u in family if abs(value) >= UNITS[u].factor), family[-1])
                break
        number, unit_text = value / (UNITS[unit].factor if unit in UNITS else 1.0), unit
    if number != 0 and math.isfinite(number):
        step = 10.0 ** (math.floor(math.log10(abs(number))) - 3)
        number = (math.ceil(number / step - 1e-9) if direction == "up" else math.floor(number / step + 1e-9)) * step
    text = f"{number:.4g}" if abs(number) < 1e6 else f"{number:.0f}"
    if unit_text == "%":
        return f"+{text}%" if number >= 0 else f"{text}%"
    return f"{text} {unit_text}".strip()
