"""Devices are complete and consistent: catalog ids exist and fit the kind, a disk never computes,
and a device without a catalog id writes the figures the cost model needs (E240-E243)."""
from __future__ import annotations

import difflib

from lwdsl import ast
from lwdsl.errors import Diagnostic
from lwdsl.semantics.context import Context, error


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    from lwdsl.hardware.catalog import LOCAL, hardware_entry, hardware_ids

    found: list[Diagnostic] = []
    ids = hardware_ids()
    for device in plan.target.devices:
        if device.kind == "disk" and device.compute is not None:
            found.append(error("E240", f"disk `{device.name}` has a `compute` figure, and a disk never computes",
                               device.compute.span, "remove `compute`, or make it a `cpu` or `gpu` device"))
        if device.catalog is None:
            needed = ["memory", "bandwidth"] + ([] if device.kind == "disk" else ["compute"])
            missing = [prop for prop in needed if getattr(device, prop) is None]
            if missing:
                found.append(error("E243", f"device `{device.name}` has no {' / '.join(missing)}", device.span,
                                   f"write {' and '.join(missing)} in its block, or give a catalog id such as "
                                   f'"{ids[0]}" (or "local" to measure this machine)'))
        elif device.catalog not in ids:
            close = difflib.get_close_matches(device.catalog, ids, n=3)
            hint = f"did you mean {', '.join(f'`{c}`' for c in close)}?" if close else f"known: {', '.join(ids)}"
            found.append(error("E241", f"unknown hardware catalog id `{device.catalog}`", device.span, hint))
        elif device.catalog != LOCAL:
            kind = hardware_entry(device.catalog).get("kind")
            if kind and kind != device.kind:
                found.append(error("E242", f"`{device.catalog}` is a {kind}, and `{device.name}` is declared "
                                           f"`{device.kind}`", device.span, f"write `device {device.name} {kind} "
                                                                            f'"{device.catalog}"`'))
    return found
