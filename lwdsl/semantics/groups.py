"""Device groups and switches mean something (v1, E290-E297): a group has 1..1024 devices, a
reference `g[*]` / `g[A..B]` names a declared group and a non-empty range inside it, a group stands only
where several devices may, and a switch joins at least two known devices and has a rate (written, or its GPUs' catalog interconnect).

Runs on the plan as written (groups not yet expanded, see `lwdsl.groups`); the other checks run on the
expanded plan."""
from __future__ import annotations

import difflib
from typing import Iterator

from lwdsl import ast
from lwdsl.errors import Diagnostic, Span
from lwdsl.groups import GROUP_REF, MAX_GROUP, group_sizes, resolve_ref
from lwdsl.semantics.context import Context, error, walk_techniques


def _references(plan: ast.Plan) -> Iterator[tuple[str, Span, str, bool]]:
    """(reference, span, where, one device needed) for every device reference of the plan."""
    for link in plan.target.links:
        yield link.a, link.span, "a link end", False
        yield link.b, link.span, "a link end", False
    for switch in plan.target.switches:
        for ref in switch.devices:
            yield ref, switch.span, f"a member of switch `{switch.name}`", False
    for constraint in plan.require:
        if constraint.metric.name == "memory" and constraint.metric.qualifier is not None:
            yield constraint.metric.qualifier, constraint.metric.span, "`memory`", False
    if plan.objective is not None:
        for term in plan.objective.terms:
            if term.metric.name == "memory" and term.metric.qualifier is not None:
                yield term.metric.qualifier, term.metric.span, "an objective's `memory`", True
    for technique, _ in walk_techniques(plan.allow.techniques):
        if isinstance(technique, ast.Offload):
            for ref in technique.devices:
                yield ref, technique.span, "`offload`", False
        elif isinstance(technique, ast.OffloadOptimizer):
            yield technique.device, technique.span, "`offload optimizer`", True


def _reference_problem(ref: str, span: Span, where: str, single: bool, groups: dict[str, int],
                       names: set[str]) -> Diagnostic | None:
    match = GROUP_REF.match(ref)
    if match is None:
        if ref not in groups or ref in names:
            return None
        if single:
            return error("E293", f"`{ref}` is a group of {groups[ref]} devices, and {where} takes one device",
                         span, f"name one of them, e.g. `{ref}0`")
        return error("E293", f"`{ref}` is a group of {groups[ref]} devices: write `{ref}[*]` for all of them "
                             f"or `{ref}0` for one", span, f"{where} names devices, not a group's stem")
    stem = match["stem"]
    if stem not in groups:
        stems = list(groups)
        close = difflib.get_close_matches(stem, stems, n=1)
        hint = (f"did you mean `{close[0]}`?" if close else
                f"declare it as `device {stem}[N] ...`" + (f"; the groups: {', '.join(stems)}" if stems else ""))
        return error("E290", f"`{ref}`: `{stem}` is not a device group", span, hint)
    if single:
        return error("E293", f"`{ref}` stands for several devices, and {where} takes one device", span,
                     f"name one of them, e.g. `{stem}0`")
    if match["all"]:
        return None
    first, last, size = int(match["first"]), int(match["last"]), groups[stem]
    if first > last:
        return error("E291", f"`{ref}` is an empty range", span, f"write the lower index first: `{stem}[{last}..{first}]`")
    if first < 0 or last >= size:
        return error("E292", f"`{ref}` reaches past the group: `{stem}` has devices {stem}0 .. {stem}{size - 1}",
                     span, f"indices run from 0 to {size - 1}")
    return None


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    for device in plan.target.devices:
        if device.count is not None and not 1 <= device.count <= MAX_GROUP:
            found.append(error("E296", f"device group `{device.name}[{device.count}]` must hold 1 to {MAX_GROUP} "
                                       f"devices", device.span, "write the number of identical devices, e.g. `[8]`"))
    groups = group_sizes(plan.target)
    names = {d.name for d in plan.target.devices if d.count is None}
    for ref, span, where, single in _references(plan):
        problem = _reference_problem(ref, span, where, single, groups, names)
        if problem is not None:
            found.append(problem)
    known = names | {f"{stem}{i}" for stem, size in groups.items() for i in range(size)}
    for switch in plan.target.switches:
        members: list[str] = []
        broken = False  # a member already reported: counting the rest would only repeat it
        for ref in switch.devices:
            resolved = resolve_ref(ref, groups)
            broken |= resolved is None or (ref in groups and ref not in names)
            for name in resolved or ():
                if name not in known:
                    close = difflib.get_close_matches(name, sorted(known), n=3)
                    found.append(error("E295", f"switch `{switch.name}` names `{name}`, which is not a device of "
                                               f"the target", switch.span,
                                       f"did you mean {', '.join(f'`{c}`' for c in close)}?" if close else None))
                    broken = True
                elif name not in members:
                    members.append(name)
        if switch.rate is None and not broken and not _interconnect_known(members, plan.target.devices, groups):
            found.append(error("E297", f"switch `{switch.name}` has no rate, and none of its devices has a catalog "
                                       "interconnect to take it from", switch.span,
                               f"write the rate of each port, e.g. `switch {switch.name} {{ ... }} 450 GB/s`"))
        if len(members) < 2 and not broken:
            found.append(error("E294", f"switch `{switch.name}` joins {len(members)} device"
                                       f"{'' if len(members) == 1 else 's'}; a switch joins two or more", switch.span,
                               "list every device on the switch, e.g. `{ gpu[*] }`, or write a `link`"))
    return _once(found)


def _interconnect_known(members: list[str], devices: tuple[ast.Device, ...], groups: dict[str, int]) -> bool:
    from lwdsl.hardware.catalog import LOCAL, hardware_entry, hardware_ids

    ids = set(hardware_ids()) - {LOCAL}
    by_name = {name: d for d in devices for name in ((resolve_ref(f"{d.name}[*]", groups) or ()) if d.count else (d.name,))}
    return any(by_name[m].catalog in ids and hardware_entry(by_name[m].catalog).get("interconnect")
               for m in members if m in by_name)


def _once(found: list[Diagnostic]) -> list[Diagnostic]:
    """A reference problem once per place (a link names both its ends on one span)."""
    seen: set = set()
    out = []
    for diagnostic in found:
        key = (diagnostic.code, diagnostic.message, diagnostic.span)
        if key not in seen:
            seen.add(key)
            out.append(diagnostic)
    return out
