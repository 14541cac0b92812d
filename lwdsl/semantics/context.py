"""What a meaning check may read besides the plan: the plan's folder and, once the model source is
known to be usable, the model's inventory (module names)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lwdsl import ast
from lwdsl.errors import Diagnostic, Span


@dataclass(frozen=True)
class Context:
    base_dir: Path
    inventory: Any = None  # lwdsl.inventory.Inventory, set only for the checks that need it


def error(code: str, message: str, span: Span | None, hint: str | None = None) -> Diagnostic:
    return Diagnostic(code=code, message=message, span=span, hint=hint)


def walk_techniques(techniques, inside: ast.Within | None = None) -> Iterator[tuple[Any, ast.Within | None]]:
    """Every technique of an allow-list, those inside `within` blocks too, with the innermost `within`."""
    for technique in techniques:
        yield technique, inside
        if isinstance(technique, ast.Within):
            yield from walk_techniques(technique.techniques, technique)


def metrics(plan: ast.Plan) -> Iterator[ast.Metric]:
    """Every metric the plan names: in `require` and in the objective."""
    for constraint in plan.require:
        yield constraint.metric
    if plan.objective is not None:
        for term in plan.objective.terms:
            yield term.metric
