"""`--pareto A,B`: the frontier between two metrics, by the epsilon-constraint method.

Start from the best B (ties: best A); then demand A strictly better than the last point and take the
best B again; repeat until nothing is better in A (or MAX_POINTS). Every point is optimal for its
bound, over all scenarios (tensor degree, KV format), with every `require` line held.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from lwdsl.errors import fail
from lwdsl.hardware import resolve_target
from lwdsl.inventory import load_inventory
from lwdsl.cost import evaluate as evaluate_plan
from lwdsl.solve import readback
from lwdsl.solve.model import compile_problem, solve_lexicographic
from lwdsl.solve.problem import Objective, Requirement, evaluate
from lwdsl.units import UNITS

MAX_POINTS = 12
NAMES = {"memory": "memory", "latency": "latency:token", "latency token": "latency:token",
         "latency prefill": "latency:prefill", "latency request": "latency:request", "quality": "quality:perplexity",
         "quality perplexity": "quality:perplexity", "quality kld": "quality:kld", "cost": "cost", "time": "time",
         "throughput": "latency:token"}


def parse_pair(text: str) -> tuple[str, str]:
    """`memory,quality` -> ("memory", "quality:perplexity"); `memory gpu0` names one device."""
    parts = [" ".join(p.replace(":", " ").split()) for p in text.split(",")]
    if len(parts) != 2:
        raise fail("E505", f"--pareto takes two metrics separated by a comma, not '{text}'",
                   hint="e.g. --pareto memory,quality or --pareto latency,cost")
    pair = []
    for part in parts:
        if part in NAMES:
            pair.append(NAMES[part])
        elif part.startswith("memory "):
            pair.append("memory:" + part.split()[1])
        else:
            raise fail("E505", f"--pareto: unknown metric '{part}'", hint=f"known: {', '.join(sorted(NAMES))}")
    if pair[0] == pair[1]:
        raise fail("E505", "--pareto needs two different metrics")
    return pair[0], pair[1]


def frontier(plan_file, pair: tuple[str, str], time_limit_s: float = 60.0, workers: int = 1) -> list[dict]:
    """Points `{A: value, B: value, "tensor_parallel", "kv_format", "status"}` in base units, best B first.

    The same quality source as `solve` (the stored profile when there is one) and the same figures: each
    point is the cost model's evaluation of the choices found (`lwdsl.cost.evaluate`), as `solve` prints
    them, so no point is dominated by `solve`'s own answer under the same `require` lines."""
    from lwdsl.solve.search import _profile, scenarios_of

    plan = plan_file.plan
    inventory, target = load_inventory(plan.model, plan_file.base_dir), resolve_target(plan.target)
    profile = _profile(plan_file)
    scenarios = scenarios_of(plan, inventory, target, plan_file.text, profile)
    blocks = {w.module: w.block for w in inventory.weights if not w.is_bias}

    def figures(settings, trial, outcome) -> dict[str, float]:
        layers = readback.layer_choices(trial, outcome.assignment, blocks)
        predicted = evaluate_plan(inventory, target, plan.workload, layers, settings["kv_format"],
                                  settings["tensor_parallel"], quality_profile=profile)
        return {metric: readback.predicted_value(plan, metric, predicted) for metric in pair}
    first, second = pair
    points: list[dict] = []

    def best_over_scenarios(objectives, bound):
        best = None
        for settings, problem, _ in scenarios:
            extra = () if bound is None else (Requirement(first, "<=", bound, 0, "pareto bound"),)
            trial = replace(problem, requirements=problem.requirements + extra, objectives=objectives)
            outcome = solve_lexicographic(compile_problem(trial, hard=list(range(len(trial.requirements)))),
                                          time_limit_s=time_limit_s / (MAX_POINTS + 1), workers=workers,
                                          tie_break=False)
            if outcome.status not in ("OPTIMAL", "FEASIBLE"):
                continue
            values = evaluate(trial, outcome.assignment)  # every metric, also when a later stage ran out of time
            key = tuple(values[o.metric] for o in objectives)
            if best is None or key < best[0]:
                best = (key, settings, outcome.status, values, trial, outcome)
        return best

    lowest = best_over_scenarios((Objective(first), Objective(second)), None)
    if lowest is None:
        return []
    floor = lowest[3][first]
    bound = None
    step = 1
    for index in range(MAX_POINTS):
        best = best_over_scenarios((Objective(second), Objective(first)), bound)
        if best is None:
            break
        _, settings, status, values = best[:4]
        a_value, b_value = values[first], values[second]
        if index == 0:  # spread the points evenly between the best-B end and the best-A end
            step = max(1, (a_value - floor) // max(1, MAX_POINTS - 1))
        predicted = figures(settings, *best[4:])
        points.append({first: predicted[first], second: predicted[second],
                       "tensor_parallel": settings["tensor_parallel"],
                       "kv_format": settings["kv_format"].label() if settings["kv_format"] else None,
                       "status": status})
        if a_value <= floor:
            break
        bound = max(floor, a_value - step)
    return points


def axis_unit(metric: str, values: list[float], plan=None) -> tuple[str, float]:
    """(unit, base units per unit) to plot `metric` in: the unit its `require` line is written in, else
    one that fits the values (MiB/GiB, us/ms/s, %, $/h)."""
    written = _bound_lines(plan, metric)
    head = metric.split(":")[0]
    if head == "quality" and metric != "quality:kld":
        return "%", 0.01
    if written and written[0][1].unit in UNITS and written[0][1].kind in ("size", "time"):
        return written[0][1].unit, UNITS[written[0][1].unit].factor
    largest = max((abs(v) for v in values if v is not None), default=0.0)
    if head == "memory":
        return ("GiB", 2.0 ** 30) if largest >= 2 ** 30 else ("MiB", 2.0 ** 20)
    if head in ("latency", "time"):
        return ("s", 1.0) if largest >= 1 else (("ms", 1e-3) if largest >= 1e-3 else ("us", 1e-6))
    if head == "cost":
        return "$/h", 1.0
    return "", 1.0


def _bound_lines(plan, metric: str) -> list:
    """(op, value quantity) of the plan's `require` lines on `metric` (a device group's line once)."""
    if plan is None:
        return []
    from lwdsl.solve.build import metric_key

    found = []
    holders = [d for d in plan.target.devices if d.kind != "disk"]
    for constraint in plan.require:
        if constraint.metric.name == "throughput":
            continue
        key = metric_key(constraint.metric)[0]
        if metric == "memory" and len(holders) == 1 and key == f"memory:{holders[0].name}":
            key = "memory"  # one device that holds memory: its line bounds the total too
        if key == metric and (constraint.op, constraint.value) not in found:
            found.append((constraint.op, constraint.value))
    return found


def _bound_value(quantity) -> float:
    return quantity.value  # base units: bytes, seconds, a fraction, $/h


def plot(points: list[dict], pair: tuple[str, str], path: str | Path, plan=None) -> Path:
    """The frontier as a step plot in the plan's units, the `require` bounds on either metric drawn as
    dashed lines, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, axes = plt.subplots(figsize=(6, 4))
    (x_unit, x_scale), (y_unit, y_scale) = (axis_unit(m, [p[m] for p in points], plan) for m in pair)
    xs, ys = [p[pair[0]] / x_scale for p in points], [p[pair[1]] / y_scale for p in points]
    axes.plot(xs, ys, marker="o", drawstyle="steps-post", label="frontier")
    for op, quantity in _bound_lines(plan, pair[0]):
        axes.axvline(_bound_value(quantity) / x_scale, color="tab:red", linestyle="--",
                     label=f"require {pair[0].replace(':', ' ')} {op} {quantity.text}")
    for op, quantity in _bound_lines(plan, pair[1]):
        axes.axhline(_bound_value(quantity) / y_scale, color="tab:orange", linestyle="--",
                     label=f"require {pair[1].replace(':', ' ')} {op} {quantity.text}")
    axes.set_xlabel(f"{pair[0].replace(':', ' ')} ({x_unit})" if x_unit else pair[0].replace(":", " "))
    axes.set_ylabel(f"{pair[1].replace(':', ' ')} ({y_unit})" if y_unit else pair[1].replace(":", " "))
    axes.legend(fontsize="small")
    axes.set_title("Pareto frontier (each point optimal for its bound)")
    axes.grid(True, alpha=0.3)
    fd, partial = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(partial, dpi=120, bbox_inches="tight")
        os.replace(partial, path)
    finally:
        plt.close(figure)
        Path(partial).unlink(missing_ok=True)
    return path


def render_frontier(points: list[dict], pair: tuple[str, str], image: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from lwdsl.solve.render import show

    table = Table(title=f"Pareto frontier: {pair[0]} vs {pair[1]}")
    for column in (pair[0], pair[1], "tensor", "kv"):
        table.add_column(column.replace(":", " "))
    for point in points:
        table.add_row(show(pair[0].replace(":", " "), point[pair[0]]), show(pair[1].replace(":", " "), point[pair[1]]),
                      str(point["tensor_parallel"]), str(point["kv_format"]))
    console = Console()
    console.print(table)
    console.print(f"plot: {image}" if points else "no point: the plan has no solution")
