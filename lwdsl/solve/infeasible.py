"""Why a plan has no solution: a minimal set of conflicting lines, and where each would have to move.

CP-SAT's `sufficient_assumptions_for_infeasibility` names a set of guards that cannot hold together,
but often every guard (seen on an 80-layer toy): not minimal. Deletion shrinks it: drop one line,
re-solve; if still infeasible the line was not needed. What remains is minimal (dropping any one
line makes it feasible). The order is the plan's line order, so the answer is deterministic. A plan
line that stands for several requirements (`memory gpu[*] <= 80 GB`) is kept or dropped whole, and
appears once in a set.
Each check compiles the lines it keeps as hard constraints: with guard literals left free, CP-SAT
took over 10 s to prove what presolve proves in 10 ms with the lines hard (70B plan, measured).

Several Problems (one per global scenario: tensor degree, KV format, ...) count as one problem: a
set of lines is feasible when any scenario satisfies it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lwdsl.solve.model import best_common_value, best_value, compile_problem, feasible
from lwdsl.solve.problem import Problem


@dataclass(frozen=True)
class ConflictLine:
    requirement: int  # index into Problem.requirements (the line's first, when it stands for several)
    needed: int | None  # the bound it would need (integer units), None when no value helps
    members: tuple[int, ...] = ()  # every requirement the line stands for (`memory gpu[*] <= 80 GB`: eight)


def line_groups(problem: Problem, among=None) -> list[list[int]]:
    """Requirements by the plan line they come from, in line order: a line written for a device group
    (`memory gpu[*] <= 80 GB`) is one line with several requirements, kept, dropped and moved together."""
    pool = range(len(problem.requirements)) if among is None else among
    groups: dict[tuple, list[int]] = {}
    for r in sorted(pool, key=lambda r: (problem.requirements[r].line, r)):
        requirement = problem.requirements[r]
        groups.setdefault((requirement.line, requirement.column, requirement.kind, requirement.op), []).append(r)
    return list(groups.values())


def _feasible_any(scenarios: list[Problem], active: list[int], time_limit_s: float, workers: int) -> bool:
    """True when some scenario satisfies `active`; unknown (time out) counts as feasible, so a line is
    only kept in the conflict when it is proven needed."""
    return any(feasible(compile_problem(p, active), [], time_limit_s, workers) is not False for p in scenarios)


def minimal_conflict(scenarios: list[Problem], time_limit_s: float = 5.0, workers: int = 1,
                     among: list[int] | None = None) -> list[int]:
    """Requirement indices forming a minimal infeasible set (empty: infeasible with no line at all).
    `among`: look only at these lines (they must be infeasible together)."""
    problem = scenarios[0]
    groups = line_groups(problem, among)
    if _feasible_any(scenarios, [], time_limit_s, workers) or not scenarios:
        kept = [r for group in groups for r in group]
    else:
        return []
    for group in groups:  # a plan line at a time: the lines of a group go together
        trial = [k for k in kept if k not in group]
        if not _feasible_any(scenarios, trial, time_limit_s, workers):
            kept = trial
    return kept


def conflict_sets(scenarios: list[Problem], time_limit_s: float = 5.0, workers: int = 1) -> list[list[int]]:
    """Disjoint minimal conflicts: one, then another among the lines left while those still conflict,
    so that relaxing the first set's lines is not followed by a surprise."""
    left = list(range(len(scenarios[0].requirements)))
    found: list[list[int]] = []
    while True:
        conflict = minimal_conflict(scenarios, time_limit_s, workers, among=left)
        if not conflict and found:
            break
        found.append(conflict)
        left = [r for r in left if r not in conflict]
        if not conflict or _feasible_any(scenarios, left, time_limit_s, workers):
            return found
    return found


def needed_values(scenarios: list[Problem], conflict: list[int], time_limit_s: float = 5.0,
                  workers: int = 1) -> list[ConflictLine]:
    """For each plan line of the conflict, once: the best its metric can be with the other lines held —
    the value the line would have to move to (a `<=` bound up to it, a `>=` bound down to it). A value
    some solution reaches, so the line moved there (the rest of its set held) is feasible. A line for
    several requirements (a device group) moves all of them to one value: the best worst of them."""
    problem = scenarios[0]
    lines = []
    for group in line_groups(problem, conflict):
        requirement = problem.requirements[group[0]]
        others = [k for k in conflict if k not in group]
        sense = "min" if requirement.op == "<=" else "max"
        metrics = [problem.requirements[r].metric for r in group]
        best = None
        for scenario in scenarios:
            compiled = compile_problem(scenario, others)
            value = (best_value(compiled, metrics[0], sense, [], time_limit_s, workers) if len(metrics) == 1 else
                     best_common_value(compiled, metrics, sense, time_limit_s, workers))
            if value is not None and (best is None or (value < best if sense == "min" else value > best)):
                best = value
        lines.append(ConflictLine(group[0], best, tuple(group)))
    return lines
