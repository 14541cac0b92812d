"""Identical units as one unit with a count, and the counts back into one choice per original unit.

Blocks of a model read from a config (or with priors) have identical cost tables; a 70B model's 80
blocks then differ only by name. CP-SAT spends its time permuting such symmetric choices; counting
them instead (how many blocks sit on the GPU, how many q_proj take int4) is the same problem without
the symmetry. Read-back is deterministic: earlier blocks take the earlier places and, within a
place, the options in (tag, option) order, so layers that must agree on a tag (one MLP's prune) do.
Units joined by hops (a pipeline, where the order matters) are never aggregated.
"""
from __future__ import annotations

from dataclasses import replace

from lwdsl.solve.problem import Counts, Problem


def _options_signature(options, seen: dict) -> int:
    """A small number per distinct options table: the table's full signature is hashed once, not once
    per unit that holds it (hashing the nested tuples per unit was a second of the 70B plans' build)."""
    if id(options) not in seen:  # builders share one options tuple between equal layers
        full = tuple((o.key, o.tag, tuple(None if c is None else tuple(sorted(c.items())) for c in o.by_place))
                     for o in options)
        canonical = seen.setdefault("canonical", {})
        seen[id(options)] = (options, canonical.setdefault(full, len(canonical)))
    return seen[id(options)][1]


def _signature(problem: Problem, u: int, layer_ids: list[int], seen: dict) -> tuple:
    unit = problem.units[u]
    places = tuple((p.label, p.compute, p.storage, tuple(sorted(p.coefs.items())), p.uses) for p in unit.places)
    layers = tuple(_options_signature(problem.layers[l].options, seen) for l in layer_ids)
    return unit.count, places, layers


def aggregate(problem: Problem) -> Problem:
    """`problem` with identical single units merged (no-op when hops join units)."""
    if problem.hops:
        return problem
    layers_of: dict[int, list[int]] = {u: [] for u in range(len(problem.units))}
    for l, layer in enumerate(problem.layers):
        layers_of[layer.unit].append(l)
    classes: dict[tuple, list[int]] = {}
    seen: dict = {}
    for u, unit in enumerate(problem.units):
        key = _signature(problem, u, layers_of[u], seen) if unit.count == 1 else ("alone", u)
        classes.setdefault(key, []).append(u)
    tag_groups = {}
    for group in problem.same_tag:
        tag_groups.setdefault(problem.layers[group[0]].unit, []).append(group)
    units, layers, same_tag = [], [], []
    for members in classes.values():
        first = members[0]
        unit = problem.units[first]
        index = len(units)
        units.append(replace(unit, count=len(members) if len(members) > 1 else unit.count,
                             members=tuple(problem.units[m].name for m in members) if len(members) > 1 else ()))
        renumber = {}
        for position, l in enumerate(layers_of[first]):
            renumber[l] = len(layers)
            names = tuple(problem.layers[layers_of[m][position]].name for m in members) if len(members) > 1 else ()
            layers.append(replace(problem.layers[l], unit=index, names=names))
        for group in tag_groups.get(first, []):
            same_tag.append(tuple(renumber[l] for l in group))
    return replace(problem, units=tuple(units), layers=tuple(layers), same_tag=tuple(same_tag))


def expand(problem: Problem, counts: Counts) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """(original unit name -> place index, original layer name -> (option index, place index))."""
    unit_place: dict[str, int] = {}
    layer_pick: dict[str, tuple[int, int]] = {}
    sequences: dict[int, list[int]] = {}
    for u, (unit, row) in enumerate(zip(problem.units, counts.places)):
        sequence = [p for p, n in enumerate(row) for _ in range(n)]
        sequences[u] = sequence
        for i, name in enumerate(unit.members or (unit.name,) * len(sequence)):
            unit_place[name] = sequence[i]
    for l, (layer, table) in enumerate(zip(problem.layers, counts.options)):
        sequence = sequences[layer.unit]
        names = layer.names or (layer.name,) * len(sequence)
        order = sorted(range(len(layer.options)), key=lambda o: (layer.options[o].tag, o))
        for p in sorted(set(sequence)):
            picks = [o for o in order for _ in range(table[o][p])]
            slots = [i for i, q in enumerate(sequence) if q == p]
            for slot, o in zip(slots, picks):
                layer_pick[names[slot]] = (o, p)
    return unit_place, layer_pick


def drop_dominated(problem: Problem) -> Problem:
    """Options no better than another option of the same layer in any metric, on every place, are
    dropped (fp16 next to bf16, an unstructured prune that saves no byte): the optimum stays, the
    search shrinks. Metrics that some line wants large (`>=`, `maximize`) must be equal to dominate.
    Equal options keep the first (least change)."""
    upward = set()
    for requirement in problem.requirements:
        if requirement.op == ">=":
            upward |= set(problem.base_metrics(requirement.metric))
    for objective in problem.objectives:
        if objective.sense == "max":
            upward |= set(problem.base_metrics(objective.metric))

    def no_worse(better: dict | None, worse: dict | None) -> bool:
        if worse is None:
            return True
        if better is None:
            return False
        for metric in set(better) | set(worse):
            a, b = better.get(metric, 0), worse.get(metric, 0)
            if a > b or (metric in upward and a != b):
                return False
        return True

    layers = []
    for layer in problem.layers:
        kept = []
        for o, option in enumerate(layer.options):
            dominated = any(
                other.tag == option.tag and all(no_worse(x, y) for x, y in zip(other.by_place, option.by_place))
                and (q < o or not all(no_worse(y, x) for x, y in zip(other.by_place, option.by_place)))
                for q, other in enumerate(layer.options) if q != o)
            if not dominated:
                kept.append(option)
        layers.append(replace(layer, options=tuple(kept)))
    return replace(problem, layers=tuple(layers))
