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
from lwdsl.solve.build import from_units
from lwdsl.solve.model import compile_problem, solve_lexicographic
from lwdsl.solve.problem import Objective, Requirement, evaluate

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
    """Points `{A: value, B: value, "tensor_parallel", "kv_format", "status"}` in base units, best B first."""
    from lwdsl.solve.search import scenarios_of

    plan = plan_file.plan
    inventory, target = load_inventory(plan.model, plan_file.base_dir), resolve_target(plan.target)
    scenarios = scenarios_of(plan, inventory, target, plan_file.text, None)
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
                best = (key, settings, outcome.status, values)
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
        _, settings, status, values = best
        a_value, b_value = values[first], values[second]
        if index == 0:  # spread the points evenly between the best-B end and the best-A end
            step = max(1, (a_value - floor) // max(1, MAX_POINTS - 1))
        points.append({first: from_units(first, a_value), second: from_units(second, b_value),
                       "tensor_parallel": settings["tensor_parallel"],
                       "kv_format": settings["kv_format"].label() if settings["kv_format"] else None,
                       "status": status})
        if a_value <= floor:
            break
        bound = max(floor, a_value - step)
    return points


def plot(points: list[dict], pair: tuple[str, str], path: str | Path) -> Path:
    """The frontier as a step plot, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, axes = plt.subplots(figsize=(6, 4))
    xs, ys = [p[pair[0]] for p in points], [p[pair[1]] for p in points]
    axes.plot(xs, ys, marker="o", drawstyle="steps-post")
    axes.set_xlabel(pair[0].replace(":", " "))
    axes.set_ylabel(pair[1].replace(":", " "))
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
