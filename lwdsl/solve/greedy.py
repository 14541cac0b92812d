"""A greedy baseline over the same cost model, as Hugging Face Accelerate's `device_map="auto"` places
a model: one weight format for every layer (the smallest allowed one whose prior meets the plan's
quality line), then blocks in module order onto the fastest compute device until its memory budget
is full, then the next device, then the offload devices (streamed to the fastest compute device
linked to them). No search: for comparison in the benchmark (`bench/bench_solver.py`).
"""
from __future__ import annotations

from lwdsl import ast
from lwdsl.cost import evaluate
from lwdsl.cost.formats import format_applies, weight_bytes
from lwdsl.hardware.records import ResolvedTarget
from lwdsl.inventory.records import Inventory
from lwdsl.solution import LayerChoice, Predicted, QuantFormat
from lwdsl.solve.allowed import AS_LOADED, NO_PRUNE, allowance


def _budget(plan: ast.Plan, target: ResolvedTarget, device: str) -> float:
    bound = float(target.device(device).memory_bytes)
    for constraint in plan.require:
        if constraint.metric.name == "memory" and constraint.metric.qualifier == device:
            bound = min(bound, constraint.value.value)
    return bound


def _uniform_format(plan: ast.Plan, inventory: Inventory, target: ResolvedTarget) -> QuantFormat:
    allowed = allowance(plan.allow.techniques)
    limit = next((c.value.value for c in plan.require if c.metric.name == "quality"
                  and c.metric.qualifier in (None, "perplexity") and c.value.relative), None)
    linear = inventory.linear_layers()
    candidates = sorted(allowed.formats, key=lambda f: sum(weight_bytes(w.shape, f) for w in linear))
    device = target.compute_devices()[0]
    for fmt in candidates:
        layers = [LayerChoice(name=w.module, block=w.block, format=fmt, device=device, compute_device=device)
                  for w in linear if format_applies(w.shape, fmt) is None and not allowed.for_module(w.module).kept]
        quality = evaluate(inventory, target, plan.workload, layers).quality.perplexity_increase
        if limit is None or quality <= limit:
            return fmt
    return AS_LOADED


def greedy_layers(plan: ast.Plan, inventory: Inventory, target: ResolvedTarget) -> list[LayerChoice]:
    """Accelerate-style placement of a uniformly quantized model (see the module docstring)."""
    allowed = allowance(plan.allow.techniques)
    fmt = _uniform_format(plan, inventory, target)
    computes = sorted(target.compute_devices(), key=lambda d: -target.device(d).bandwidth_Bps)
    if not allowed.pipeline:  # one device computes; the others can only hold streamed weights
        computes = computes[:1]
    stores = [d for d in allowed.offload if d in target.devices and d not in computes[:1]]
    blocks = inventory.arch.layers

    tiers = [(d, d) for d in computes] + [(s, next((c for c in computes if target.route(s, c)), computes[0]))
                                          for s in stores]

    def choices(counts: list[tuple[str, str, int]]) -> list[LayerChoice]:
        where: list[tuple[str, str]] = []
        for storage, compute, n in counts:
            where += [(storage, compute)] * n
        where += [tiers[-1]] * (blocks - len(where))  # not placed yet: on the last tier
        out = []
        for w in inventory.weights:
            if w.is_bias or not (w.is_linear or w.role == "embedding"):
                continue
            storage, compute = where[w.block] if w.block is not None else (computes[0], computes[0])
            keep = allowed.for_module(w.module).kept or not w.is_linear or format_applies(w.shape, fmt) is not None
            out.append(LayerChoice(name=w.module, block=w.block, format=AS_LOADED if keep else fmt, prune=NO_PRUNE,
                                   device=storage, compute_device=compute))
        return out

    def fits(counts, devices) -> bool:
        predicted = evaluate(inventory, target, plan.workload, choices(counts))
        return all(held.total_bytes <= _budget(plan, target, name)
                   for name, held in predicted.memory.by_device.items() if name in devices)

    placed: list[tuple[str, str, int]] = []
    left = blocks
    for storage, compute in tiers[:-1]:
        if left == 0:
            break
        low, high = 0, left  # the most blocks this tier takes with the earlier tiers as placed
        while low < high:
            middle = (low + high + 1) // 2
            if fits(placed + [(storage, compute, middle)], {storage, compute}):
                low = middle
            else:
                high = middle - 1
        if low:
            placed.append((storage, compute, low))
            left -= low
    return choices(placed)  # the rest on the last tier (over budget when nothing else had room)


def greedy_predicted(plan: ast.Plan, inventory: Inventory, target: ResolvedTarget) -> Predicted:
    return evaluate(inventory, target, plan.workload, greedy_layers(plan, inventory, target))
