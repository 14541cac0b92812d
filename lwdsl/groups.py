"""Device groups (v1): `device gpu[8] ...` declares gpu0 .. gpu7, and `gpu[*]` / `gpu[2..5]` stand
for all of them or a range wherever a device name may stand. `expand_plan` rewrites a parsed plan into
the same plan with every group written out, one device per name, so that the stages after it (names,
hardware, cost, solve) see plain devices only; `fmt` prints the plan as written, groups kept.

    >>> refs = group_sizes(plan.target)            # {"gpu": 8}
    >>> resolve_ref("gpu[2..3]", refs)             # ("gpu2", "gpu3")

What a group means where it stands:
- `link A <-> B`: one link for every pair of distinct devices (a of A, b of B), each pair once, so
  `link gpu[*] <-> host` is eight links and `link gpu[*] <-> gpu[*]` the full mesh;
- `require memory gpu[*] <= 80 GB`: the bound on each device of the group (one line, eight bounds);
- `offload gpu[*]`, `switch s { gpu[*], host }`: every member.
A group where one device is needed (`offload optimizer`, a `memory` objective) is an error
(`lwdsl.semantics.groups`); here it stands for its first member so that no other check repeats it.
"""
from __future__ import annotations

import re

from lwdsl import ast

GROUP_REF = re.compile(r"^(?P<stem>[A-Za-z_][A-Za-z0-9_]*)\[(?:(?P<all>\*)|(?P<first>-?\d+)\.\.(?P<last>-?\d+))\]$")
MAX_GROUP = 1024  # devices in one group: beyond this a typo, not a machine


def member_name(stem: str, index: int) -> str:
    return f"{stem}{index}"


def group_sizes(target: ast.Target) -> dict[str, int]:
    """The target's groups: stem -> number of devices (groups with an unusable count are left out)."""
    return {d.name: d.count for d in target.devices if d.count is not None and 1 <= d.count <= MAX_GROUP}


def is_group_ref(ref: str) -> bool:
    return GROUP_REF.match(ref) is not None


def resolve_ref(ref: str, groups: dict[str, int]) -> tuple[str, ...] | None:
    """The device names a reference stands for: a plain name is itself; `g[*]` every member, `g[A..B]`
    members A to B (both included). None when the reference cannot be resolved (no such group, an
    empty or out-of-range range, a group's bare stem): `lwdsl.semantics.groups` says why."""
    match = GROUP_REF.match(ref)
    if match is None:
        return None if ref in groups else (ref,)  # a bare stem names no one device
    size = groups.get(match["stem"])
    if size is None:
        return None
    if match["all"]:
        return tuple(member_name(match["stem"], i) for i in range(size))
    first, last = int(match["first"]), int(match["last"])
    if not 0 <= first <= last < size:
        return None
    return tuple(member_name(match["stem"], i) for i in range(first, last + 1))


def _many(refs, groups: dict[str, int]) -> tuple[str, ...]:
    names: list[str] = []
    for ref in refs:
        for name in resolve_ref(ref, groups) or ():
            if name not in names:
                names.append(name)
    return tuple(names)


def _one(ref: str, groups: dict[str, int]) -> str:
    if ref in groups:  # a bare group stem where one device is needed: reported by the group check
        return member_name(ref, 0)
    names = resolve_ref(ref, groups)
    return names[0] if names else ref


def _links(links: tuple[ast.Link, ...], groups: dict[str, int]) -> tuple[ast.Link, ...]:
    out: list[ast.Link] = []
    for link in links:
        if resolve_ref(link.a, groups) == (link.a,) and resolve_ref(link.b, groups) == (link.b,):
            out.append(link)
            continue
        seen: set[frozenset] = set()
        for a in resolve_ref(link.a, groups) or ():
            for b in resolve_ref(link.b, groups) or ():
                pair = frozenset((a, b))
                if a != b and pair not in seen:
                    seen.add(pair)
                    out.append(link.model_copy(update={"a": a, "b": b}))
    return tuple(out)


def _devices(devices: tuple[ast.Device, ...]) -> tuple[ast.Device, ...]:
    out: list[ast.Device] = []
    for device in devices:
        if device.count is None:
            out.append(device)
        else:
            out += [device.model_copy(update={"name": member_name(device.name, i), "count": None})
                    for i in range(min(max(device.count, 0), MAX_GROUP))]
    return tuple(out)


def _techniques(techniques, groups: dict[str, int]) -> tuple:
    out = []
    for technique in techniques:
        if isinstance(technique, ast.Offload):
            technique = technique.model_copy(update={"devices": _many(technique.devices, groups)})
        elif isinstance(technique, ast.OffloadOptimizer):
            technique = technique.model_copy(update={"device": _one(technique.device, groups)})
        elif isinstance(technique, ast.Within):
            technique = technique.model_copy(update={"techniques": _techniques(technique.techniques, groups)})
        out.append(technique)
    return tuple(out)


def _require(require: tuple[ast.Constraint, ...], groups: dict[str, int]) -> tuple[ast.Constraint, ...]:
    out: list[ast.Constraint] = []
    for constraint in require:
        qualifier = constraint.metric.qualifier
        if constraint.metric.name != "memory" or qualifier is None or not is_group_ref(qualifier):
            out.append(constraint)
            continue
        for name in resolve_ref(qualifier, groups) or ():
            metric = constraint.metric.model_copy(update={"qualifier": name})
            out.append(constraint.model_copy(update={"metric": metric}))
    return tuple(out)


def _objective(objective: ast.Objective | None, groups: dict[str, int]) -> ast.Objective | None:
    if objective is None:
        return None
    terms = []
    for term in objective.terms:
        if term.metric.name == "memory" and term.metric.qualifier is not None:
            term = term.model_copy(update={"metric": term.metric.model_copy(
                update={"qualifier": _one(term.metric.qualifier, groups)})})
        terms.append(term)
    return objective.model_copy(update={"terms": tuple(terms)})


def has_groups(plan: ast.Plan) -> bool:
    return any(d.count is not None for d in plan.target.devices) or bool(plan.target.switches) or any(
        is_group_ref(ref) for link in plan.target.links for ref in (link.a, link.b))


def expand_plan(plan: ast.Plan) -> ast.Plan:
    """The plan with every group written out (devices, links, switch members, offload lists, `memory`
    bounds); a plan without groups comes back as it is. Spans stay those of the lines written."""
    groups = group_sizes(plan.target)
    switches = tuple(s.model_copy(update={"devices": _many(s.devices, groups)}) for s in plan.target.switches)
    target = plan.target.model_copy(update={"devices": _devices(plan.target.devices),
                                            "links": _links(plan.target.links, groups), "switches": switches})
    allow = plan.allow.model_copy(update={"techniques": _techniques(plan.allow.techniques, groups)})
    return plan.model_copy(update={"target": target, "require": _require(plan.require, groups), "allow": allow,
                                   "objective": _objective(plan.objective, groups)})
