"""`recover distill up to N steps` in the solver: the step count is a global scenario choice.

Each scenario fixes a step count s from `cost.recovery.step_levels(N)`; its quality coefficients
(every `quality*` term of every option, place and constant) are the compression's, scaled by
`1 - r(s)` (rounded up, as every coefficient is), so the model stays linear and exact per scenario
and the quality lines and objectives see the recovered quality. Scenarios with more steps come later
in the canonical order: between equal objectives the fewer steps win.
"""
from __future__ import annotations

import dataclasses
import math

from lwdsl.cost.recovery import RecoveryCurve, recovered_fraction, step_levels


def _scaled(coefs, keep: float):
    if coefs is None:
        return None
    return {k: (math.ceil(v * keep) if k.startswith("quality") else v) for k, v in coefs.items()}


def with_recovery(problem, fraction: float):
    """The same Problem with every quality coefficient scaled by `1 - fraction`."""
    if fraction <= 0:
        return problem
    keep = 1.0 - fraction
    layers = tuple(dataclasses.replace(layer, options=tuple(
        dataclasses.replace(o, by_place=tuple(_scaled(c, keep) for c in o.by_place)) for o in layer.options))
        for layer in problem.layers)
    units = tuple(dataclasses.replace(unit, places=tuple(
        dataclasses.replace(p, coefs=_scaled(p.coefs, keep)) for p in unit.places)) for unit in problem.units)
    return dataclasses.replace(problem, layers=layers, units=units, constants=_scaled(problem.constants, keep))


def recovery_scenarios(scenarios: list, up_to: int, curve: RecoveryCurve) -> list:
    """Every (settings, Problem, extra) once per step level; settings gain `recover_steps`."""
    if up_to <= 0:
        return scenarios
    found = []
    for steps in step_levels(up_to):
        fraction = recovered_fraction(curve, steps)
        for settings, problem, extra in scenarios:
            found.append(({**settings, "recover_steps": steps}, with_recovery(problem, fraction), extra))
    return found
