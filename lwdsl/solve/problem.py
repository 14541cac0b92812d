"""The Problem: a table of decisions with integer linear costs. Pure data; no solver, no plan.

    unit u      a placement decision (a transformer block, or the embedding + head): one `Place` each
    layer l     a format/prune decision inside a unit: one `Option` each, with its coefficients
                for every place of its unit (None where that combination is impossible)

A metric's value is the sum of the coefficients of everything chosen, plus constants, plus the
`charges` of every device used, plus the `hops` between adjacent units; `derived` metrics are
integer combinations of base metrics (`latency:request = latency:prefill + generate · latency:token`).
Every coefficient is an integer in the metric's unit (`scales`: bytes, nanoseconds, 1e-9 perplexity).
Plain frozen dataclasses: a 70B problem holds ~30,000 options, too many to validate one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Coefs = dict[str, int]  # metric -> integer coefficient


@dataclass(frozen=True)
class Place:
    """Where a unit lives: the device that computes it and the one that stores its weights."""

    label: str  # "gpu0", "gpu0<-ssd"
    compute: str
    storage: str
    coefs: Coefs = field(default_factory=dict)  # the unit's own terms here (KV cache, attention, norms)
    uses: tuple[str, ...] = ()  # devices this place makes "used" (charges apply once each)


@dataclass(frozen=True)
class Unit:
    name: str  # "block 3", "embedding + head"
    places: tuple[Place, ...]


@dataclass(frozen=True)
class Option:
    """One format/prune choice of one layer; `by_place[p]` its coefficients on the unit's place p."""

    key: str  # "int4 g128 / channels 25%"
    by_place: tuple[Coefs | None, ...]
    payload: object = None  # what the builder needs to read the choice back (not used here)


@dataclass(frozen=True)
class Layer:
    name: str
    unit: int
    options: tuple[Option, ...]  # least change first: the order is the tie-break
    note: str | None = None  # e.g. formats that are not options here, and why


@dataclass(frozen=True)
class Hop:
    """Adjacent units `a` -> `b`: coefficients when a's compute device differs from b's."""

    a: int
    b: int
    coefs: dict[tuple[str, str], Coefs]  # (compute of a, compute of b) -> coefficients
    forbidden: frozenset[tuple[str, str]] = frozenset()  # no link: impossible, not free


@dataclass(frozen=True)
class Requirement:
    """One guarded line: `metric op bound` in integer units; `line`/`text` point into the plan."""

    metric: str
    op: Literal["<=", ">="]
    bound: int
    line: int
    text: str
    kind: Literal["require", "capacity"] = "require"


@dataclass(frozen=True)
class Objective:
    metric: str
    sense: Literal["min", "max"] = "min"


@dataclass(frozen=True)
class Problem:
    units: tuple[Unit, ...]
    layers: tuple[Layer, ...]
    requirements: tuple[Requirement, ...] = ()
    objectives: tuple[Objective, ...] = ()
    constants: Coefs = field(default_factory=dict)
    charges: dict[str, Coefs] = field(default_factory=dict)  # device -> coefficients when it is used
    forced_used: frozenset[str] = frozenset()  # devices used whatever is chosen
    hops: tuple[Hop, ...] = ()
    derived: dict[str, dict[str, int]] = field(default_factory=dict)  # metric -> {base metric: factor}
    single_compute: bool = False  # no pipeline: every unit computes on the same device
    scales: dict[str, float] = field(default_factory=dict)  # metric -> base units per integer unit

    def base_metrics(self, metric: str) -> dict[str, int]:
        """`metric` as a combination of base metrics."""
        return self.derived.get(metric, {metric: 1})

    def compute_devices(self) -> list[str]:
        seen: dict[str, None] = {}
        for unit in self.units:
            for place in unit.places:
                seen.setdefault(place.compute)
        return list(seen)


@dataclass(frozen=True)
class Assignment:
    """A choice for every unit (place index) and layer (option index)."""

    places: tuple[int, ...]
    options: tuple[int, ...]


def evaluate(problem: Problem, assignment: Assignment) -> dict[str, int] | None:
    """Every metric's integer value under `assignment`, None when the assignment is impossible.

    The brute-force reference the CP-SAT model is tested against; also used to read values back.
    """
    totals: dict[str, int] = dict(problem.constants)

    def add(coefs: Coefs) -> None:
        for metric, value in coefs.items():
            totals[metric] = totals.get(metric, 0) + value

    computes = [problem.units[u].places[p].compute for u, p in enumerate(assignment.places)]
    if problem.single_compute and len(set(computes)) > 1:
        return None
    used = set(problem.forced_used)
    for u, p in enumerate(assignment.places):
        place = problem.units[u].places[p]
        add(place.coefs)
        used.update(place.uses)
    for layer, o in zip(problem.layers, assignment.options):
        coefs = layer.options[o].by_place[assignment.places[layer.unit]]
        if coefs is None:
            return None
        add(coefs)
    for hop in problem.hops:
        pair = (computes[hop.a], computes[hop.b])
        if pair[0] == pair[1]:
            continue
        if pair in hop.forbidden:
            return None
        add(hop.coefs.get(pair, {}))
    for device in sorted(used):
        add(problem.charges.get(device, {}))
    for metric in list(problem.derived):
        totals[metric] = sum(f * totals.get(m, 0) for m, f in problem.derived[metric].items())
    return totals


def holds(requirement: Requirement, values: dict[str, int]) -> bool:
    value = values.get(requirement.metric, 0)
    return value <= requirement.bound if requirement.op == "<=" else value >= requirement.bound
