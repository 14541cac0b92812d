"""The CP-SAT model against brute-force enumeration on small random problems (hypothesis)."""
from __future__ import annotations

import itertools
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lwdsl.solve.infeasible import minimal_conflict, needed_values
from lwdsl.solve.model import compile_problem, feasible, solve_lexicographic
from lwdsl.solve.problem import (Assignment, Hop, Layer, Objective, Option, Place, Problem, Requirement, Unit,
                                 evaluate,
                                 holds)

METRICS = ("memory:a", "memory:b", "time", "loss")
DERIVED = {"memory": {"memory:a": 1, "memory:b": 1}, "request": {"time": 3, "loss": 1}}


def coefs(draw) -> dict[str, int]:
    return {m: draw(st.integers(0, 9)) for m in METRICS}


@st.composite
def problems(draw, max_units=3, max_layers=4):
    units = []
    for u in range(draw(st.integers(1, max_units))):
        places = []
        for p in range(draw(st.integers(1, 3))):
            compute = draw(st.sampled_from("ab"))
            storage = draw(st.sampled_from(["ab", compute, compute]))[0]  # "a" stores off "b"'s compute
            places.append(Place(label=f"{compute}{p}", compute=compute, storage=storage, coefs=coefs(draw),
                                uses=(compute, storage)))
        units.append(Unit(name=f"u{u}", places=tuple(places)))
    layers = []
    for l in range(draw(st.integers(1, max_layers))):
        unit = draw(st.integers(0, len(units) - 1))
        options = []
        for o in range(draw(st.integers(1, 3))):
            by_place = tuple(None if (o and draw(st.integers(0, 5)) == 0) else coefs(draw)
                             for _ in units[unit].places)
            options.append(Option(key=f"o{o}", by_place=by_place, tag=draw(st.sampled_from(["", "cut"]))))
        layers.append(Layer(name=f"l{l}", unit=unit, options=tuple(options)))
    hops = []
    for a in range(len(units) - 1):
        if draw(st.booleans()):
            forbidden = frozenset([("a", "b")]) if draw(st.booleans()) else frozenset()
            hops.append(Hop(a=a, b=a + 1, coefs={("a", "b"): {"time": draw(st.integers(0, 9))},
                                                 ("b", "a"): {"time": draw(st.integers(0, 9))}},
                            forbidden=forbidden))
    same_tag = ((0, len(layers) - 1),) if len(layers) > 1 and draw(st.booleans()) else ()
    all_metrics = METRICS + tuple(DERIVED)
    requirements = tuple(
        Requirement(metric=draw(st.sampled_from(all_metrics)), op=draw(st.sampled_from(["<=", ">="])),
                    bound=draw(st.integers(0, 60)), line=10 + r, text=f"r{r}")
        for r in range(draw(st.integers(0, 3))))
    objectives = tuple(Objective(metric=draw(st.sampled_from(all_metrics)), sense=draw(st.sampled_from(["min", "max"])))
                       for _ in range(draw(st.integers(1, 2))))
    return Problem(units=tuple(units), layers=tuple(layers), requirements=requirements, objectives=objectives,
                   constants={"time": draw(st.integers(0, 5))},
                   charges={"a": {"memory:a": draw(st.integers(0, 9))}, "b": {"loss": draw(st.integers(0, 9))}},
                   hops=tuple(hops), derived=DERIVED, same_tag=same_tag, single_compute=draw(st.booleans()),
                   in_flight=draw(st.sampled_from([0, 2])))


def enumerate_all(problem: Problem):
    place_ranges = [range(len(u.places)) for u in problem.units]
    option_ranges = [range(len(l.options)) for l in problem.layers]
    for places in itertools.product(*place_ranges):
        for options in itertools.product(*option_ranges):
            values = evaluate(problem, Assignment(places=places, options=options))
            if values is not None:
                yield values


def brute_force(problem: Problem, active: list[int]) -> tuple[int, ...] | None:
    best = None
    for values in enumerate_all(problem):
        if all(holds(problem.requirements[r], values) for r in active):
            key = tuple(values.get(o.metric, 0) * (1 if o.sense == "min" else -1) for o in problem.objectives)
            best = key if best is None or key < best else best
    return best


FAST = settings(max_examples=int(os.environ.get("LWDSL_HYPOTHESIS_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(problems())
def test_lexicographic_optimum_equals_brute_force(problem):
    outcome = solve_lexicographic(compile_problem(problem), time_limit_s=10)
    expected = brute_force(problem, list(range(len(problem.requirements))))
    if expected is None:
        assert outcome.status == "INFEASIBLE"
        return
    assert outcome.status == "OPTIMAL"
    got = tuple(v * (1 if o.sense == "min" else -1) for (_, v), o in zip(outcome.values, problem.objectives))
    assert got == expected
    values = evaluate(problem, outcome.assignment)
    assert values is not None and all(holds(r, values) for r in problem.requirements)
    assert tuple(values.get(o.metric, 0) * (1 if o.sense == "min" else -1) for o in problem.objectives) == expected


@FAST
@given(problems())
def test_infeasible_problems_get_a_minimal_conflict(problem):
    everything = list(range(len(problem.requirements)))
    if brute_force(problem, everything) is not None:
        assert feasible(compile_problem(problem), everything) is True
        return
    conflict = minimal_conflict([problem])
    assert brute_force(problem, conflict) is None  # really infeasible
    for r in conflict:  # and minimal: dropping any one line makes it feasible
        assert brute_force(problem, [k for k in conflict if k != r]) is not None
    for line in needed_values([problem], conflict):
        requirement = problem.requirements[line.requirement]
        others = [k for k in conflict if k != line.requirement]
        relaxed = Requirement(metric=requirement.metric, op=requirement.op, bound=line.needed, line=0, text="")
        moved = Problem(**{**problem.__dict__, "requirements": problem.requirements + (relaxed,)})
        assert brute_force(moved, others + [len(problem.requirements)]) is not None


def test_same_answer_with_one_or_two_workers():
    units = tuple(Unit(
        name=f"u{u}", places=(Place("a", "a", "a", {"memory:a": 3}, ("a",)),
                              Place("b", "b", "b", {"memory:b": 3}, ("b",)))) for u in range(6))
    layers = tuple(Layer(name=f"l{l}", unit=l % 6, options=tuple(
        Option(key=f"o{o}", by_place=({"memory:a": 4 - o, "loss": o}, {"memory:b": 4 - o, "loss": o}))
        for o in range(3))) for l in range(18))
    problem = Problem(units=units, layers=layers, derived=DERIVED,
                      requirements=(Requirement("memory:a", "<=", 30, 1, "a"), Requirement("memory:b", "<=", 40, 2, "b")),
                      objectives=(Objective("loss"),))
    one = solve_lexicographic(compile_problem(problem), workers=1)
    two = solve_lexicographic(compile_problem(problem), workers=2)
    assert one.status == two.status == "OPTIMAL"
    assert one.assignment == two.assignment


@st.composite
def block_copies(draw):
    """A block template (places, layers with options, a same-tag pair) and how many identical copies."""
    copies = draw(st.integers(1, 3))
    # two places on one compute device (resident, streamed from "b"): copies may split between them
    places = tuple(Place(label=c if s == c else f"{c}<-{s}", compute=c, storage=s, coefs=coefs(draw), uses=(c, s))
                   for c, s in draw(st.sampled_from([(("a", "a"),), (("a", "a"), ("b", "b")), (("a", "a"), ("a", "b"))])))
    templates = []
    for l in range(draw(st.integers(1, 3))):
        templates.append(tuple(Option(key=f"o{o}", by_place=tuple(coefs(draw) for _ in places),
                                      tag=draw(st.sampled_from(["", "cut"])))
                               for o in range(draw(st.integers(1, 3)))))
    tagged = draw(st.booleans()) and len(templates) > 1
    requirements = tuple(Requirement(metric=draw(st.sampled_from(METRICS)), op="<=", bound=draw(st.integers(0, 80)),
                                     line=r + 1, text=f"r{r}") for r in range(draw(st.integers(0, 2))))
    objectives = (Objective(draw(st.sampled_from(METRICS))), Objective(draw(st.sampled_from(METRICS + ("memory",)))))
    charges = {"a": {"memory:a": 2}, "b": {"loss": 3}}

    def problem(aggregated: bool) -> Problem:
        blocks = 1 if aggregated else copies
        units = tuple(Unit(name=f"b{u}", places=places, count=copies if aggregated else 1) for u in range(blocks))
        layers = tuple(Layer(name=f"b{u}.l{l}", unit=u, options=options)
                       for u in range(blocks) for l, options in enumerate(templates))
        same = tuple((u * len(templates), u * len(templates) + 1) for u in range(blocks)) if tagged else ()
        return Problem(units=units, layers=layers, requirements=requirements, objectives=objectives,
                       charges=charges, derived=DERIVED, same_tag=same, single_compute=True)

    return problem(False), problem(True)


@FAST
@given(block_copies())
def test_aggregating_identical_blocks_keeps_the_optimum(pair):
    expanded, aggregated = pair
    one = solve_lexicographic(compile_problem(expanded), time_limit_s=10)
    many = solve_lexicographic(compile_problem(aggregated), time_limit_s=10)
    assert one.status == many.status
    assert brute_force(expanded, list(range(len(expanded.requirements)))) == (
        None if one.status == "INFEASIBLE" else tuple(v for _, v in one.values))
    if one.status == "OPTIMAL":
        assert one.values == many.values
        assert evaluate(aggregated, many.assignment) is not None
