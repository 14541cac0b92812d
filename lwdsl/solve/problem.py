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
    """A placement decision, or `count` identical ones (blocks with equal cost tables): aggregating
    them into counts removes the permutation symmetry that keeps CP-SAT from proving optimality."""

    name: str  # "block 3", "blocks 0-79", "embedding + head"
    places: tuple[Place, ...]
    count: int = 1
    members: tuple[str, ...] = ()  # names of the units aggregated here, in order


@dataclass(frozen=True)
class Option:
    """One format/prune choice of one layer; `by_place[p]` its coefficients on the unit's place p."""

    key: str  # "int4 g128 / channels 25%"
    by_place: tuple[Coefs | None, ...]
    payload: object = None  # what the builder needs to read the choice back (not used here)
    tag: str = ""  # layers in one `Problem.same_tag` group pick options with equal tags


@dataclass(frozen=True)
class Layer:
    name: str
    unit: int
    options: tuple[Option, ...]  # least change first: the order is the tie-break
    note: str | None = None  # e.g. formats that are not options here, and why
    names: tuple[str, ...] = ()  # one per member when its unit aggregates identical units


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
    column: int = 0  # where the line's constraint starts: lines written for a device group share it


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
    exclusive: tuple[tuple[str, str], ...] = ()  # use tokens that cannot both be on (no link between)
    same_tag: tuple[tuple[int, ...], ...] = ()  # layer groups that must agree (one MLP's channel prune)
    scales: dict[str, float] = field(default_factory=dict)  # metric -> base units per integer unit
    # streamed units resident at once where they compute: `memory:<compute>` grows by this many times
    # the largest streamed unit's bytes (see `streamed_peak`)
    in_flight: int = 0

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


@dataclass(frozen=True)
class Counts:
    """How many copies of each unit sit on each place, and of each layer take each option there
    (one-hot when every unit's count is 1): what the CP-SAT model returns."""

    places: tuple[tuple[int, ...], ...]  # [unit][place]
    options: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][option][place]

    @staticmethod
    def of(problem: "Problem", assignment: Assignment) -> "Counts":
        places = tuple(tuple(int(p == chosen) for p in range(len(unit.places)))
                       for unit, chosen in zip(problem.units, assignment.places))
        options = tuple(tuple(tuple(int(o == chosen and p == assignment.places[layer.unit])
                                    for p in range(len(problem.units[layer.unit].places)))
                              for o in range(len(layer.options)))
                        for layer, chosen in zip(problem.layers, assignment.options))
        return Counts(places, options)


def evaluate(problem: Problem, assignment: Assignment | Counts) -> dict[str, int] | None:
    """Every metric's integer value, None when the choice is impossible.

    The brute-force reference the CP-SAT model is tested against; also used to read values back.
    """
    counts = Counts.of(problem, assignment) if isinstance(assignment, Assignment) else assignment
    totals: dict[str, int] = dict(problem.constants)

    def add(coefs: Coefs, times: int = 1) -> None:
        for metric, value in coefs.items():
            totals[metric] = totals.get(metric, 0) + value * times

    for unit, row in zip(problem.units, counts.places):
        if sum(row) != unit.count or min(row) < 0:
            return None
    for layer, table in zip(problem.layers, counts.options):
        for p, here in enumerate(counts.places[layer.unit]):
            if sum(column[p] for column in table) != here:
                return None
    active = [[p for p, n in enumerate(row) if n] for row in counts.places]
    computes = {problem.units[u].places[p].compute for u, row in enumerate(active) for p in row}
    if problem.single_compute and len(computes) > 1:
        return None
    for group in problem.same_tag:  # tags agree; within one unit place by place (copies pair up there)
        one_unit = len({problem.layers[l].unit for l in group}) == 1
        tallies = []
        for l in group:
            tally: dict[tuple[str, int], int] = {}
            for option, column in zip(problem.layers[l].options, counts.options[l]):
                for p, n in enumerate(column):
                    key = (option.tag, p if one_unit else 0)
                    tally[key] = tally.get(key, 0) + n
            tallies.append({k: v for k, v in tally.items() if v})
        if any(t != tallies[0] for t in tallies):
            return None
    used = set(problem.forced_used)
    for u, row in enumerate(counts.places):
        for p, n in enumerate(row):
            if n:
                place = problem.units[u].places[p]
                add(place.coefs, n)
                used.update(place.uses)
    for layer, table in zip(problem.layers, counts.options):
        for option, column in zip(layer.options, table):
            for p, n in enumerate(column):
                if n:
                    if option.by_place[p] is None:
                        return None
                    add(option.by_place[p], n)
    computes = [problem.units[u].places[row[0]].compute if len(row) == 1 else None for u, row in enumerate(active)]
    for hop in problem.hops:
        pair = (computes[hop.a], computes[hop.b])
        if pair[0] == pair[1]:
            continue
        if pair in hop.forbidden:
            return None
        add(hop.coefs.get(pair, {}))
    if any(a in used and b in used for a, b in problem.exclusive):
        return None
    for device, held in streamed_peak(problem, counts).items():
        totals[f"memory:{device}"] = totals.get(f"memory:{device}", 0) + problem.in_flight * held
    for device in sorted(used):
        add(problem.charges.get(device, {}))
    for metric in list(problem.derived):
        totals[metric] = sum(f * totals.get(m, 0) for m, f in problem.derived[metric].items())
    return totals


def streamed_peak(problem: Problem, counts: Counts) -> dict[str, int]:
    """By computing device, the bytes of the largest unit streamed to it: per unit on a place that
    stores off its compute device, each layer's largest option chosen there (exact when the copies of
    an aggregated unit agree, an upper bound otherwise: the CP-SAT model encodes the same)."""
    peak: dict[str, int] = {}
    if not problem.in_flight:
        return peak
    by_unit: dict[int, list[int]] = {}
    for l, layer in enumerate(problem.layers):
        by_unit.setdefault(layer.unit, []).append(l)
    for u, unit in enumerate(problem.units):
        for p, spot in enumerate(unit.places):
            if spot.storage == spot.compute or not counts.places[u][p]:
                continue
            key = f"memory:{spot.storage}"
            held = sum(max([(option.by_place[p] or {}).get(key, 0) for option, column
                            in zip(problem.layers[l].options, counts.options[l]) if column[p]], default=0)
                       for l in by_unit.get(u, []))
            peak[spot.compute] = max(peak.get(spot.compute, 0), held)
    return peak


def holds(requirement: Requirement, values: dict[str, int]) -> bool:
    value = values.get(requirement.metric, 0)
    return value <= requirement.bound if requirement.op == "<=" else value >= requirement.bound
