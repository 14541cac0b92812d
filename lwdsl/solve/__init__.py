"""The solve stage: Problem -> CP-SAT -> Solution; infeasibility explained; Pareto frontiers.

    problem.py     decisions with integer linear costs (pure data) and their brute-force evaluation
    allowed.py     what the plan's `allow` block permits each module
    build.py       plan + inventory + target + cost model -> one Problem per global scenario
    aggregate.py   identical blocks counted instead of enumerated; dominated options dropped
    model.py       Problem -> CP-SAT; lexicographic objectives; tie-break; read-back
    infeasible.py  minimal conflicting lines (deletion) and the value each would need
    search.py      the whole stage: `solve_plan(plan_file) -> SolveResult` (Solution inside)
    readback.py / training.py / greedy.py / pareto.py / render.py / write.py

The package is callable: `lwdsl.solve("plans/laptop_8b.lwp") -> Solution` (lazy: importing
`lwdsl` does not import OR-Tools).
"""
from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, plan, time_limit_s: float = 60.0, workers: int = 1, use_profile: bool = True):
        """Solve a plan (a path, or a loaded `lwdsl.plans.PlanFile`): its `Solution` (status,
        layers, predicted, conflicts). Never raises for an unmet plan: status says INFEASIBLE."""
        from lwdsl.plans import PlanFile, load_plan
        from lwdsl.solve.search import solve_plan

        plan_file = plan if isinstance(plan, PlanFile) else load_plan(plan)
        return solve_plan(plan_file, time_limit_s, workers, use_profile).solution


sys.modules[__name__].__class__ = _CallableModule
