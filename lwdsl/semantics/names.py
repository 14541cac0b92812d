"""Names resolve: devices are named once, links join two known devices, and every device a plan
mentions (offload, `offload optimizer`, `memory DEVICE`) is one of the target's (E210-E213)."""
from __future__ import annotations

import difflib

from lwdsl import ast
from lwdsl.errors import Diagnostic
from lwdsl.semantics.context import Context, error, metrics, walk_techniques


def _unknown(name: str, known: list[str], span, what: str) -> Diagnostic:
    close = difflib.get_close_matches(name, known, n=3)
    hint = (f"did you mean {', '.join(f'`{c}`' for c in close)}?" if close
            else f"the target's devices: {', '.join(f'`{k}`' for k in known) or 'none'}")
    return error("E210", f"{what} `{name}` is not a device of the target", span, hint)


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    names: dict[str, ast.Device] = {}
    for device in plan.target.devices:
        if device.name in names:
            found.append(error("E211", f"device `{device.name}` is declared twice (first at line "
                                       f"{names[device.name].span.line})", device.span, "give each device its own name"))
        else:
            names[device.name] = device
    known = list(names)
    if not any(d.kind in ("cpu", "gpu") for d in plan.target.devices):
        found.append(error("E213", "the target has no device that computes", plan.target.span,
                           'add a `cpu` or `gpu` device, e.g. `device host cpu "local"`'))
    pairs: dict[frozenset, ast.Link] = {}
    for link in plan.target.links:
        for end in (link.a, link.b):
            if end not in names:
                found.append(_unknown(end, known, link.span, "link end"))
        if link.a == link.b:
            found.append(error("E212", f"link joins `{link.a}` to itself", link.span, "a link joins two devices"))
        pair = frozenset((link.a, link.b))
        if pair in pairs:
            found.append(error("E212", f"a second link between `{link.a}` and `{link.b}` (first at line "
                                       f"{pairs[pair].span.line})", link.span, "write one link per pair"))
        pairs.setdefault(pair, link)
    for technique, _ in walk_techniques(plan.allow.techniques):
        if isinstance(technique, ast.Offload):
            found += [_unknown(d, known, technique.span, "offload target") for d in technique.devices if d not in names]
        elif isinstance(technique, ast.OffloadOptimizer) and technique.device not in names:
            found.append(_unknown(technique.device, known, technique.span, "offload target"))
    for metric in metrics(plan):
        if metric.name == "memory" and metric.qualifier is not None and metric.qualifier not in names:
            found.append(_unknown(metric.qualifier, known, metric.span, "memory of"))
    return found
