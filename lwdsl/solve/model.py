"""Problem -> CP-SAT model; lexicographic solve; values read back into an `Assignment`.

Variables (one family each):
    place[u, p]        unit u lives on place p                      (exactly one per unit)
    assign[l, o, p]    layer l takes option o while its unit is on p (exactly one per layer;
                       sum over o equals place[unit(l), p])
    used[d]            device d holds or computes something
    hop[h, a, b]       adjacent units compute on devices a != b
    compute[d]         without a pipeline: the one device that computes everything
    guard[r]           requirement r is enforced (an assumption literal, so conflicts map to lines)

CP-SAT objects never leave this module: `Outcome` carries plain values.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from lwdsl.solve.problem import Counts, Objective, Problem

STATUS = {cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE", cp_model.INFEASIBLE: "INFEASIBLE",
          cp_model.MODEL_INVALID: "INVALID", cp_model.UNKNOWN: "UNKNOWN"}
SEED = 20260101


@dataclass
class Compiled:
    model: cp_model.CpModel
    problem: Problem
    place: dict[tuple[int, int], cp_model.IntVar]
    assign: dict[tuple[int, int, int], cp_model.IntVar]
    guard: list[cp_model.IntVar]
    expr: dict[str, cp_model.LinearExpr]
    tie_break: cp_model.LinearExpr
    tie_break_max: int


@dataclass(frozen=True)
class Outcome:
    status: str  # OPTIMAL / FEASIBLE / INFEASIBLE / UNKNOWN
    assignment: Counts | None = None
    values: tuple[tuple[str, int], ...] = ()  # objective metrics reached, in stage order
    gap: float | None = None
    wall_s: float = 0.0
    solves: int = 0
    tie_break_proven: bool = True  # False: optimal objectives, but the pick among equals hit its budget


def _metric_terms(problem: Problem) -> set[str]:
    metrics = set(problem.constants)
    for unit in problem.units:
        for place in unit.places:
            metrics |= set(place.coefs)
    for layer in problem.layers:
        for option in layer.options:
            for coefs in option.by_place:
                metrics |= set(coefs or {})
    for coefs in problem.charges.values():
        metrics |= set(coefs)
    return metrics


def _streamed_peak(model: cp_model.CpModel, problem: Problem, assign: dict, terms: dict) -> None:
    """`memory:<compute>` += in_flight · peak: peak = the largest streamed unit, a unit's bytes the sum
    over its layers of the largest option some copy takes there (`problem.streamed_peak`, the
    reference); exact maxima, so maximising or bounding memory from below stays exact too."""
    if not problem.in_flight:
        return
    by_unit: dict[int, list[int]] = {}
    for l, layer in enumerate(problem.layers):
        by_unit.setdefault(layer.unit, []).append(l)
    sums: dict[str, list] = {}
    for u, unit in enumerate(problem.units):
        for p, spot in enumerate(unit.places):
            if spot.storage == spot.compute:
                continue
            key, parts, top = f"memory:{spot.storage}", [], 0
            for l in by_unit.get(u, []):
                sizes = [(assign[l, o, p], (option.by_place[p] or {}).get(key, 0))
                         for o, option in enumerate(problem.layers[l].options) if (l, o, p) in assign]
                largest = max((size for _, size in sizes), default=0)
                if largest <= 0:
                    continue
                parts.append(_largest_taken(model, sizes, unit.count, f"{l},{p}"))
                top += largest
            if parts:
                sums.setdefault(spot.compute, []).append((sum(parts), top))
    for device, blocks in sums.items():
        peak = model.new_int_var(0, max(top for _, top in blocks), f"streamed_peak[{device}]")
        if _bounded_below(problem, f"memory:{device}"):
            model.add_max_equality(peak, [total for total, _ in blocks])
        else:  # memory here is only ever bounded above or minimised: `>=` is exact where it matters, and
            for total, _ in blocks:  # spares the presolve an `add_max_equality` (2.4 s -> 0.2 s on a 70B plan)
                model.add(peak >= total)
        terms.setdefault(f"memory:{device}", []).append((peak, problem.in_flight))


def _bounded_below(problem: Problem, metric: str) -> bool:
    """Whether some requirement bounds `metric` (or a metric derived from it) from below, or some
    objective maximises it: then a peak must equal its maximum exactly, not merely exceed every term."""
    def involves(name: str) -> bool:
        return name == metric or metric in problem.derived.get(name, {})
    return (any(involves(r.metric) and r.op == ">=" for r in problem.requirements)
            or any(involves(o.metric) and o.sense == "max" for o in problem.objectives))


def _largest_taken(model: cp_model.CpModel, sizes: list, count: int, name: str):
    """The largest size among the options some copy takes, exactly, as a linear sum over "some option at
    least this large is taken" literals: with distinct sizes s1 > s2 > ... > sK (s(K+1) = 0),
    largest = sum_k (s_k - s_(k+1)) * at_least[k]. Linear (no `add_max_equality`, whose presolve took
    seconds on the 70B plans' few hundred variables) and exact in both directions."""
    some_of: dict[int, list] = {}
    for var, size in sizes:
        if size <= 0:
            continue
        if count > 1:  # some copy takes this option: 1 exactly when the count is positive
            some = model.new_bool_var(f"some[{name}]")
            model.add(var <= count * some)
            model.add(var >= some)
            var = some
        some_of.setdefault(size, []).append(var)
    levels = sorted(some_of, reverse=True)
    terms, taken = [], []
    for k, size in enumerate(levels):
        taken += some_of[size]
        at_least = model.new_bool_var(f"at_least[{name},{size}]")
        for var in taken:
            model.add_implication(var, at_least)
        model.add_bool_or([at_least.Not(), *taken])
        following = levels[k + 1] if k + 1 < len(levels) else 0
        terms.append((size - following) * at_least)
    return sum(terms)


def compile_problem(problem: Problem, hard: list[int] | None = None) -> Compiled:
    """The CP-SAT model of `problem`, every requirement guarded by its own literal; with `hard`, only
    those requirements, enforced outright (no guard: presolve then uses them fully, which proves
    infeasibility far faster than free guards do) and the others left out."""
    model = cp_model.CpModel()
    terms: dict[str, list[tuple[cp_model.IntVar, int]]] = {}

    def charge(var, coefs) -> None:
        for metric, value in coefs.items():
            if value:
                terms.setdefault(metric, []).append((var, value))

    def choice_var(count: int, name: str):
        return model.new_bool_var(name) if count == 1 else model.new_int_var(0, count, name)

    # place[u, p]: where each unit lives (how many of its `count` identical copies)
    place = {(u, p): choice_var(unit.count, f"place[{u},{p}]")
             for u, unit in enumerate(problem.units) for p in range(len(unit.places))}
    for u, unit in enumerate(problem.units):
        if unit.count == 1:
            model.add_exactly_one(place[u, p] for p in range(len(unit.places)))
        else:
            model.add(sum(place[u, p] for p in range(len(unit.places))) == unit.count)
        for p, spot in enumerate(unit.places):
            charge(place[u, p], spot.coefs)

    # assign[l, o, p]: each layer's option, tied to its unit's place; impossible pairs have no variable
    assign = {}
    by_layer: dict[int, list[tuple[int, int, cp_model.IntVar]]] = {}
    tie_terms = []
    count = len(problem.layers)
    for l, layer in enumerate(problem.layers):
        unit = problem.units[layer.unit]
        width = len(unit.places)
        mine = []
        for o, option in enumerate(layer.options):
            for p, coefs in enumerate(option.by_place):
                if coefs is None:
                    continue
                var = choice_var(unit.count, f"assign[{l},{o},{p}]")
                assign[l, o, p] = var
                by_layer.setdefault(l, []).append((o, p, var))
                mine.append(var)
                charge(var, coefs)
                rank = o * width + p  # least change first, then the earlier place
                if rank:
                    tie_terms.append((var, rank * (count - l)))  # rank × position: swaps never tie
        if unit.count == 1:
            model.add_exactly_one(mine)
        else:
            model.add(sum(mine) == unit.count)
        for p in range(width):
            model.add(sum(var for (_, q, var) in by_layer.get(l, []) if q == p) == place[layer.unit, p])

    # layers of one group agree on their tag (gate, up and down lose the same channels); within one unit,
    # place by place: the copies of an aggregated unit split between places pair up within each place
    for group in problem.same_tag:
        tags = sorted({option.tag for l in group for option in problem.layers[l].options})
        one_unit = len({problem.layers[l].unit for l in group}) == 1
        width = len(problem.units[problem.layers[group[0]].unit].places) if one_unit else 1
        for tag, p in ((tag, p) for tag in tags[1:] for p in range(width)):
            picks = [sum(var for o, q, var in by_layer.get(l, [])
                         if (q == p or not one_unit) and problem.layers[l].options[o].tag == tag) for l in group]
            for first, other in zip(picks, picks[1:]):
                if isinstance(first, int) and isinstance(other, int):
                    if first != other:
                        model.add_bool_or([])  # cannot agree: infeasible
                    continue
                model.add(first == other)

    # used[d]: a device holds or computes something
    devices = sorted({d for unit in problem.units for spot in unit.places for d in spot.uses}
                     | set(problem.charges) | set(problem.forced_used))
    used_var = {}
    for device in devices:
        holders = [(place[u, p], unit.count) for u, unit in enumerate(problem.units)
                   for p, spot in enumerate(unit.places) if device in spot.uses]
        if device in problem.forced_used:
            used = model.new_constant(1)
        elif not holders:
            continue
        else:
            used = model.new_bool_var(f"used[{device}]")
            for var, count in holders:
                model.add(var <= count * used)
            model.add(sum(var for var, _ in holders) >= used)
        charge(used, problem.charges.get(device, {}))
        used_var[device] = used
    for a, b in problem.exclusive:
        if a in used_var and b in used_var:
            model.add(used_var[a] + used_var[b] <= 1)

    # compute[d]: without a pipeline, one device computes every unit
    if problem.single_compute:
        computes = problem.compute_devices()
        chosen = {d: model.new_bool_var(f"compute[{d}]") for d in computes}
        model.add_exactly_one(chosen.values())
        for (u, p), var in place.items():
            model.add(var <= problem.units[u].count * chosen[problem.units[u].places[p].compute])

    # hop[h, a, b]: adjacent units on different compute devices pay the link; no link forbids it
    for h, hop in enumerate(problem.hops):
        first, second = problem.units[hop.a], problem.units[hop.b]
        assert first.count == second.count == 1, "hops join single units (pipelines are not aggregated)"
        for pa, spot_a in enumerate(first.places):
            for pb, spot_b in enumerate(second.places):
                pair = (spot_a.compute, spot_b.compute)
                if pair[0] == pair[1]:
                    continue
                if pair in hop.forbidden:
                    model.add_bool_or([place[hop.a, pa].Not(), place[hop.b, pb].Not()])
                elif hop.coefs.get(pair):
                    var = model.new_bool_var(f"hop[{h},{pa},{pb}]")
                    model.add_bool_or([place[hop.a, pa].Not(), place[hop.b, pb].Not(), var])
                    model.add_implication(var, place[hop.a, pa])
                    model.add_implication(var, place[hop.b, pb])
                    charge(var, hop.coefs[pair])

    _streamed_peak(model, problem, assign, terms)

    expr = {}
    for metric in _metric_terms(problem):
        pairs = terms.get(metric, [])
        expr[metric] = (cp_model.LinearExpr.weighted_sum([v for v, _ in pairs], [c for _, c in pairs])
                        + problem.constants.get(metric, 0))
    for metric, parts in problem.derived.items():
        expr[metric] = sum(factor * expr.get(base, 0) for base, factor in parts.items())

    guard = []
    for r, requirement in enumerate(problem.requirements):
        if hard is not None and r not in hard:
            guard.append(model.new_constant(0))
            continue
        literal = model.new_constant(1) if hard is not None else model.new_bool_var(f"guard[{r}]")
        value = expr.get(requirement.metric, 0)
        if isinstance(value, int):  # a metric nothing contributes to: a fixed truth
            if not (value <= requirement.bound if requirement.op == "<=" else value >= requirement.bound):
                model.add_bool_or([literal.Not()])
        elif requirement.op == "<=":
            model.add(value <= requirement.bound).only_enforce_if(literal)
        else:
            model.add(value >= requirement.bound).only_enforce_if(literal)
        guard.append(literal)
    tie = cp_model.LinearExpr.weighted_sum([v for v, _ in tie_terms], [c for _, c in tie_terms])
    return Compiled(model, problem, place, assign, guard, expr, tie, sum(c for _, c in tie_terms))


def add_cutoff(compiled: Compiled, objective: Objective, value: int) -> None:
    """Only solutions at least as good as `value` on `objective` (another scenario's optimum): a
    scenario that cannot match it is then proven infeasible by its LP bound instead of solved."""
    target = compiled.expr.get(objective.metric, 0)
    if isinstance(target, int):
        return
    compiled.model.add(target <= value if objective.sense == "min" else target >= value)


def _solver(time_limit_s: float, workers: int) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.random_seed = SEED
    solver.parameters.num_workers = max(1, workers)
    solver.parameters.max_time_in_seconds = max(0.01, time_limit_s)
    # no probing in presolve: on the 70B-on-8-GPUs plan it was a third of the CPU time (2.06 s -> 1.37 s
    # in all, the same solutions); the choice models are small and their LP bound does the proving
    solver.parameters.cp_model_probing_level = 0
    return solver


def _read(compiled: Compiled, solver: cp_model.CpSolver) -> Counts:
    problem = compiled.problem
    places = tuple(tuple(int(solver.value(compiled.place[u, p])) for p in range(len(unit.places)))
                   for u, unit in enumerate(problem.units))
    options = tuple(tuple(tuple(int(solver.value(compiled.assign[l, o, p])) if (l, o, p) in compiled.assign else 0
                                for p in range(len(problem.units[layer.unit].places)))
                          for o in range(len(layer.options)))
                    for l, layer in enumerate(problem.layers))
    return Counts(places, options)


def _hint(compiled: Compiled, solver: cp_model.CpSolver) -> None:
    compiled.model.clear_hints()
    for var in list(compiled.place.values()) + list(compiled.assign.values()):
        compiled.model.add_hint(var, solver.value(var))


INT_SAFE = 2 ** 62
TIE_BREAK_DETERMINISTIC_S = 1.0  # CP-SAT deterministic seconds (not wall time: reproducible)


def _magnitude(compiled: Compiled, metric: str) -> int:
    """An upper bound of |metric| over all choices (to keep the combined objective in int64)."""
    bound = abs(compiled.problem.constants.get(metric, 0))
    problem = compiled.problem
    for base, factor in problem.base_metrics(metric).items():
        total = abs(problem.constants.get(base, 0))
        for unit in problem.units:
            total += max(abs(spot.coefs.get(base, 0)) for spot in unit.places)
        for layer in problem.layers:
            total += max(abs((coefs or {}).get(base, 0)) for option in layer.options for coefs in option.by_place)
        total += sum(abs(c.get(base, 0)) for c in problem.charges.values())
        if problem.in_flight and base.startswith("memory:"):  # the streamed peak: at most every layer's largest
            total += problem.in_flight * sum(max(abs(v) for option in layer.options for coefs in option.by_place
                                                 for k, v in (coefs or {}).items() if k.startswith("memory:"))
                                             for layer in problem.layers if layer.options)
        total += sum(abs(c.get(base, 0)) for hop in problem.hops for c in hop.coefs.values())
        bound += abs(factor) * total
    return bound


def solve_lexicographic(compiled: Compiled, active: list[int] | None = None,
                        objectives: tuple[Objective, ...] | None = None, time_limit_s: float = 30.0,
                        workers: int = 1, tie_break: bool = True) -> Outcome:
    """Optimise each objective in turn with the earlier optima fixed, then the tie-break, so that the
    optimum is unique (the same answer for any worker count). The tie-break rides in the last
    stage's objective when the scaled sum fits in int64, else it is a stage of its own.

    `active`: the requirements enforced (all by default). Mutates `compiled.model` (fixes optima):
    compile afresh for another call.
    """
    started = time.perf_counter()
    problem = compiled.problem
    active = list(range(len(problem.requirements))) if active is None else active
    objectives = problem.objectives if objectives is None else objectives
    model = compiled.model
    model.clear_hints()
    model.clear_assumptions()
    model.add_assumptions([compiled.guard[r] for r in active])
    stages: list[tuple[Objective | None, bool]] = [(o, False) for o in objectives]
    if tie_break:
        last = stages[-1][0] if stages else None
        if last is not None and (_magnitude(compiled, last.metric) + 1) * (compiled.tie_break_max + 1) < INT_SAFE:
            stages[-1] = (last, True)
        else:
            stages.append((None, True))
    if not stages:
        stages = [(None, False)]
    values: list[tuple[str, int]] = []
    status, gap, solves, assignment, tie_proven = "OPTIMAL", None, 0, None, True
    for index, (objective, with_tie) in enumerate(stages):
        target = compiled.expr.get(objective.metric, 0) if objective else 0
        if isinstance(target, int):  # nothing contributes: any choice is optimal
            if objective is not None:
                values.append((objective.metric, target))
            objective, target = None, 0
        signed = (target if objective.sense == "min" else -target) if objective else 0
        if with_tie:
            model.minimize(signed * (compiled.tie_break_max + 1) + compiled.tie_break if objective
                           else compiled.tie_break)
        elif objective:
            model.minimize(signed)
        else:
            model.clear_objective()
        if with_tie and objective is None:
            # the tie-break alone: one worker, a deterministic budget, no hint from a stage whose
            # answer may depend on the worker count — so its answer never does
            model.clear_hints()
            solver = _solver(time_limit_s - (time.perf_counter() - started), 1)
            solver.parameters.max_deterministic_time = TIE_BREAK_DETERMINISTIC_S
        else:
            solver = _solver(time_limit_s - (time.perf_counter() - started), workers)
        code = solver.solve(model)
        solves += 1
        if code in (cp_model.INFEASIBLE, cp_model.MODEL_INVALID) or (code == cp_model.UNKNOWN and assignment is None):
            return Outcome("UNKNOWN" if code == cp_model.UNKNOWN else "INFEASIBLE",
                           wall_s=time.perf_counter() - started, solves=solves)
        if code == cp_model.UNKNOWN:
            if with_tie and objective is None:
                tie_proven = False
            else:
                status = "FEASIBLE"
            break  # out of time in a later stage: keep the previous stage's answer
        if code != cp_model.OPTIMAL and with_tie and objective is None:
            tie_proven = False  # every objective is proven; only the choice among equals is not
        elif code != cp_model.OPTIMAL:
            status = "FEASIBLE"
            if gap is None and objective is not None:
                found, bound = solver.objective_value, solver.best_objective_bound
                gap = abs(found - bound) / max(1.0, abs(found))
        assignment = _read(compiled, solver)
        if objective is not None:
            value = int(solver.value(target))
            values.append((objective.metric, value))
            if index < len(stages) - 1:
                # `<=` (not `==`): the same optimum, without an equality knapsack to prove
                model.add(target <= value if objective.sense == "min" else target >= value)
        _hint(compiled, solver)
    return Outcome(status, assignment, tuple(values), gap, time.perf_counter() - started, solves, tie_proven)


def feasible(compiled: Compiled, active: list[int], time_limit_s: float = 10.0, workers: int = 1) -> bool | None:
    """Whether the requirements `active` can hold together (None: unknown within the time limit)."""
    model = compiled.model
    model.clear_objective()
    model.clear_assumptions()
    model.add_assumptions([compiled.guard[r] for r in active])
    code = _solver(time_limit_s, workers).solve(model)
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return True
    if code == cp_model.INFEASIBLE:
        return False
    return None


def best_value(compiled: Compiled, metric: str, sense: str, active: list[int], time_limit_s: float = 10.0,
               workers: int = 1) -> int | None:
    """The best value of one metric with the requirements `active` enforced (None: infeasible)."""
    model = compiled.model
    model.clear_assumptions()
    model.add_assumptions([compiled.guard[r] for r in active])
    target = compiled.expr.get(metric, 0)
    if isinstance(target, int):
        return target if feasible(compiled, active, time_limit_s, workers) else None
    model.minimize(target if sense == "min" else -target)
    solver = _solver(time_limit_s, workers)
    code = solver.solve(model)
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return int(round(solver.value(target)))


COMMON_SPAN = 2 ** 50  # any metric in the model's integer units (KiB, us, 1e-6) stays well inside


def best_common_value(compiled: Compiled, metrics: list[str], sense: str, time_limit_s: float = 10.0,
                      workers: int = 1) -> int | None:
    """The best one bound on several metrics at once (one plan line for a device group): the smallest
    largest of them (`min`) or the largest smallest (`max`), with the requirements compiled hard."""
    model = compiled.model
    model.clear_assumptions()
    exprs = [compiled.expr.get(metric, 0) for metric in metrics]
    common = model.new_int_var(-COMMON_SPAN, COMMON_SPAN, "common_bound")
    for expr in exprs:
        model.add(common >= expr if sense == "min" else common <= expr)
    model.minimize(common if sense == "min" else -common)
    solver = _solver(time_limit_s, workers)
    code = solver.solve(model)
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return int(solver.value(common))
