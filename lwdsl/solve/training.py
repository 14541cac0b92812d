"""Training plans: one decision over the training settings (ZeRO stage, activation checkpointing,
gradient accumulation, data-parallel ranks, optimizer offload), each option's figures from
`lwdsl.cost.training_breakdown`. The same CP-SAT machinery (guards, conflicts, lexicographic
objectives) applies; the option table is small (at most 4·2·k·n·m rows).
"""
from __future__ import annotations

import itertools

from lwdsl import ast
from lwdsl.cost import training_breakdown
from lwdsl.hardware.records import ResolvedTarget
from lwdsl.inventory.records import Inventory
from lwdsl.solution import Predicted, Solution
from lwdsl.solve.allowed import Allowance
from lwdsl.solve.build import SCALES, coarsen_memory
from lwdsl.solve.problem import Layer, Objective, Option, Place, Problem, Requirement, Unit


def _powers(top: int) -> list[int]:
    values, n = [], 1
    while n <= max(1, top):
        values.append(n)
        n *= 2
    return values


def settings_of(allowed: Allowance, target: ResolvedTarget) -> list[dict]:
    ranks = len(target.compute_devices())
    offloads = [None] + [d for d in allowed.offload_optimizer if d in target.devices]
    table = []
    for zero, checkpoint, accumulate, data, offload in itertools.product(
            allowed.zero, (False, True) if allowed.checkpoint else (False,), _powers(allowed.accumulate_up_to),
            [n for n in _powers(allowed.data_up_to) if n <= ranks], offloads):
        table.append({"zero_stage": zero, "checkpoint": checkpoint, "accumulate": accumulate,
                      "data_parallel": data, "offload_optimizer": offload})
    return table


def build_training(plan: ast.Plan, inventory: Inventory, target: ResolvedTarget, allowed: Allowance,
                   requirements: tuple[Requirement, ...], objectives: tuple[Objective, ...]):
    options = []
    for settings in settings_of(allowed, target):
        predicted = training_breakdown(inventory, target, plan.workload, **settings).predicted
        coefs = {f"memory:{name}": held.total_bytes for name, held in predicted.memory.by_device.items()}
        coefs["memory"] = predicted.memory.total_bytes
        coefs["time"] = int(round(predicted.training.time_s / SCALES["time"]))
        coefs["cost"] = int(round((predicted.cost_per_h or 0.0) / SCALES["cost"]))
        key = ", ".join(f"{k}={v}" for k, v in settings.items())
        options.append(Option(key, (coefs,), settings))
    unit = Unit("training", (Place("ranks", "ranks", "ranks"),))
    problem = coarsen_memory(Problem(units=(unit,), layers=(Layer("training settings", 0, tuple(options)),),
                                     requirements=requirements, objectives=_training_objectives(objectives)))
    return {"tensor_parallel": 1, "kv_format": None}, problem, {}


def _training_objectives(objectives: tuple[Objective, ...]) -> tuple[Objective, ...]:
    """Metrics meaningless for training (latency, quality) drop out; the default becomes time."""
    kept = tuple(o for o in objectives if o.metric.split(":")[0] in ("memory", "time", "cost"))
    return kept or (Objective("time"), Objective("memory"))


def read_training(plan: ast.Plan, inventory: Inventory, target: ResolvedTarget, problem: Problem, outcome,
                  base: dict) -> tuple[Solution, Predicted]:
    chosen = next(o for o, column in enumerate(outcome.assignment.options[0]) if sum(column))
    settings = problem.layers[0].options[chosen].payload
    predicted = training_breakdown(inventory, target, plan.workload, **settings).predicted
    solution = Solution(**base, status=outcome.status, gap=outcome.gap, predicted=predicted,
                        devices_used=[n for n in target.devices if n in predicted.memory.by_device],
                        notes=[f"training settings: {problem.layers[0].options[chosen].key}"])
    return solution, predicted
