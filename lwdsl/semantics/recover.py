"""`recover distill up to N steps` (v1) means something: it distils from the original model on the
`calibrate` text after compression, so it needs that text, an inference plan (a training run has
nothing compressed to recover), a whole-run place (not inside `within`) and N >= 1 (E233, E280, E221)."""
from __future__ import annotations

from lwdsl import ast
from lwdsl.errors import Diagnostic
from lwdsl.semantics.context import Context, error, walk_techniques


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    for technique, within in walk_techniques(plan.allow.techniques):
        if not isinstance(technique, ast.Recover):
            continue
        if plan.model.calibrate is None:
            found.append(error("E233", "`recover distill` needs a `calibrate` text to distil on", technique.span,
                               'add `calibrate "text:FILE"` inside the `model { ... }` block'))
        if plan.workload.type == "training":
            found.append(error("E231", "`recover distill` recovers a compressed model; this plan's workload is "
                                       "training", technique.span, "use it in an inference plan"))
        if within is not None:
            found.append(error("E280", "`recover distill` applies to the whole run, not inside `within`",
                               technique.span, "move it to the top level of `allow`"))
        if technique.up_to_steps < 1:
            found.append(error("E221", f"`recover distill up to` must be at least 1 step, found "
                                       f"{technique.up_to_steps}", technique.span))
    return found
