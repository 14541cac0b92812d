"""How a solve result reads: the JSON contract (README, "solve JSON") and the rich summary.

Both render the same `SolveResult`; the per-layer table groups layers whose choices are identical
(`model.layers.{0-27}.mlp.down_proj`).
"""
from __future__ import annotations

import re

from lwdsl.solution import LayerChoice
from lwdsl.solve.search import SolveResult

SCHEMA_VERSION = "lwdsl.solve/1"


def prune_label(choice: LayerChoice) -> str:
    prune = choice.prune
    if prune.kind == "none":
        return "none"
    if prune.kind == "2:4":
        return "2:4"
    return f"{prune.kind} {prune.fraction * 100:g}%"


def to_json(result: SolveResult) -> dict:
    """The stable JSON document of one solve (documented in the README)."""
    solution = result.solution
    return {
        "schema_version": SCHEMA_VERSION,
        "plan": solution.plan_name,
        "plan_hash": solution.plan_hash,
        "status": solution.status,
        "gap": solution.gap,
        "objective": solution.objective,
        "quality_source": result.quality_source,
        "predicted": solution.predicted.model_dump(mode="json"),
        "requirements": result.requirements,
        "kv_format": solution.kv_format.label(),
        "tensor_parallel": solution.tensor_parallel,
        "devices_used": solution.devices_used,
        "layers": [{"name": c.name, "block": c.block, "format": c.format.label(), "prune": prune_label(c),
                    "device": c.device, "compute_device": c.compute_device, "kept": c.kept, "note": c.note,
                    "loaded_as": c.loaded_as}
                   for c in solution.layers],
        "conflicts": [c.model_dump(mode="json") for c in solution.conflicts],
        "notes": solution.notes,
        "solver": {"scenarios": result.scenarios, "build_s": round(result.build_s, 4),
                   "solve_s": round(result.solve_s, 4), **result.problem_size},
    }


def group_layers(layers: list[LayerChoice]) -> list[tuple[str, LayerChoice, int]]:
    """Rows of (name pattern, choice, count): layers that differ only by block index share a row."""
    rows: dict[tuple, list] = {}
    for choice in layers:
        pattern = re.sub(r"\.(\d+)\.", ".{N}.", choice.name, count=1)
        key = (pattern, choice.format, choice.prune, choice.device, choice.compute_device, choice.kept)
        rows.setdefault(key, []).append(choice)
    grouped = []
    for (pattern, *_), members in rows.items():
        blocks = [m.block for m in members if m.block is not None]
        name = pattern.replace("{N}", _ranges(blocks)) if "{N}" in pattern else pattern
        grouped.append((name, members[0], len(members)))
    return grouped


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return "{" + ",".join(parts) + "}" if len(values) > 1 else (parts[0] if parts else "")


def _size(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    for unit, factor in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(nbytes) >= factor:
            return f"{nbytes / factor:.2f} {unit}"
    return f"{nbytes:.0f} B"


def show(metric: str, value) -> str:
    if value is None:
        return "-"
    if metric.startswith("memory"):
        return _size(value)
    if metric.startswith("latency") or metric == "time":
        return f"{value * 1e3:.3f} ms" if value < 10 else f"{value:.1f} s"
    if metric.startswith("quality perplexity") or metric == "quality":
        return f"+{value * 100:.3f}%"
    if metric == "throughput":
        return f"{value:.2f} tok/s"
    if metric == "cost":
        return f"{value:.2f} $/h"
    return f"{value:.4g}"


def render_summary(result: SolveResult, plan_file) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    solution = result.solution
    gap = f" (gap {solution.gap:.2%})" if solution.gap else ""
    colour = {"OPTIMAL": "green", "FEASIBLE": "yellow"}.get(solution.status, "red")
    console.print(f"[bold]{solution.plan_name}[/]: [{colour}]{solution.status}[/]{gap} "
                  f"in {result.solve_s:.2f} s ({result.scenarios} scenario(s), build {result.build_s:.2f} s)")
    if solution.conflicts or solution.status in ("INFEASIBLE", "UNKNOWN"):
        table = Table(title="No combination meets these lines together (a minimal set)")
        for column in ("line", "plan text", "would have to be"):
            table.add_column(column, overflow="fold")
        for conflict in solution.conflicts:
            table.add_row(f"{plan_file.path}:{conflict.line}", conflict.text, conflict.needed or "-")
        console.print(table)
        for note in solution.notes:
            console.print(f"note: {note}")
        return
    predicted = solution.predicted
    console.print(f"quality from: [bold]{result.quality_source}[/]"
                  + ("" if result.quality_source == "profile" else " (no measured profile; `lwdsl profile` makes one)"))
    console.print(f"kv cache: {solution.kv_format.label()}; tensor parallel: {solution.tensor_parallel}; "
                  f"devices used: {', '.join(solution.devices_used)}")
    table = Table(title="Requirements")
    for column in ("line", "metric", "required", "predicted", "margin", ""):
        table.add_column(column)
    for check in result.requirements:
        state = "[red]unmet[/]" if check["holds"] is False else ("binds" if check["binding"] else "")
        margin = f"{check['margin']:.1%}" if check["margin"] is not None else "-"
        table.add_row(str(check["line"]), check["metric"], f"{check['op']} {check['required']}",
                      show(check["metric"], check["predicted"]), margin, state)
    console.print(table)
    figures = Table(title="Predicted")
    figures.add_column("figure")
    figures.add_column("value")
    for name, held in predicted.memory.by_device.items():
        figures.add_row(f"memory {name}", _size(held.total_bytes))
    figures.add_row("latency token", show("latency", predicted.latency.token_s))
    figures.add_row("latency prefill", show("latency", predicted.latency.prefill_s))
    figures.add_row("throughput", show("throughput", predicted.throughput_tok_s))
    figures.add_row("quality perplexity", show("quality", predicted.quality.perplexity_increase))
    figures.add_row("cost", show("cost", predicted.cost_per_h))
    if predicted.training:
        figures.add_row("training time", show("time", predicted.training.time_s))
    console.print(figures)
    if solution.layers:
        layers = Table(title="Layers (identical choices grouped)")
        layers.add_column("modules", overflow="fold", min_width=24)
        for column in ("n", "format", "prune", "stored on", "computed on"):
            layers.add_column(column)
        for name, choice, count in group_layers(solution.layers):
            layers.add_row(name, str(count), (choice.loaded_as or choice.format.label()) + (" (kept)" if choice.kept else ""),
                           prune_label(choice), choice.device, choice.compute_device)
        console.print(layers)
    for note in solution.notes:
        console.print(f"note: {note}")
