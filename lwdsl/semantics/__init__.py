"""Meaning checks: each module checks one thing and returns every problem it finds; `check_plan`
runs them as a tuple and reports them all at once.

The model's inventory (module names) is read only when the model source passed its own check, and
its problems (E3xx) are reported with the others.
"""
from __future__ import annotations

from pathlib import Path

from lwdsl import ast
from lwdsl.errors import Diagnostic, LwdslError
from lwdsl.groups import expand_plan
from lwdsl.semantics import allow, devices, groups, metrics, model, names, ranges, recover, selectors, unit_places, workload
from lwdsl.semantics.context import Context

CHECKS = (names.check, unit_places.check, ranges.check, metrics.check, workload.check, devices.check, allow.check,
          model.check, recover.check)
INVENTORY_CHECKS = (selectors.check,)


def check_plan(plan: ast.Plan, base_dir: Path) -> list[Diagnostic]:
    """Every meaning problem of a parsed plan, sorted by place; empty when the plan means something.
    Device groups are checked as written, everything else on the plan with its groups written out."""
    context = Context(base_dir=Path(base_dir))
    found = groups.check(plan, context)
    plan = expand_plan(plan)
    found += _once_per_line([diagnostic for check in CHECKS for diagnostic in check(plan, context)])
    if not any(d.code in model.MODEL_FILE_CODES for d in found):
        from lwdsl.inventory import load_inventory

        try:
            context = Context(base_dir=context.base_dir, inventory=load_inventory(plan.model, context.base_dir))
        except LwdslError as problem:
            found += problem.diagnostics
        else:
            found += [diagnostic for check in INVENTORY_CHECKS for diagnostic in check(plan, context)]
    return sorted(found, key=lambda d: (d.span.line, d.span.column, d.code) if d.span else (0, 0, d.code))


def _once_per_line(found: list[Diagnostic]) -> list[Diagnostic]:
    """One problem of a kind per place: a line written for a group (`memory gpu[*] <= 5 s`) expands into
    one line per device, and its problem is said once."""
    seen: set = set()
    out = []
    for diagnostic in found:
        key = (diagnostic.code, diagnostic.span)
        if key not in seen:
            seen.add(key)
            out.append(diagnostic)
    return out
