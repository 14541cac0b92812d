"""The human view of an `EstimateReport`: rich tables of memory by device, time by phase, training."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lwdsl.estimate import EstimateReport


def size(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes:,.0f} B"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "impossible"
    for unit, scale in (("h", 3600.0), ("min", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value * 1e9:,.0f} ns"


def _columns(report: EstimateReport) -> list[tuple[str, EstimateReport]]:
    if report.baseline is None:
        return [("as is", report)]
    label = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    return [("as is", report.baseline), (f"with {label}", report)]


def render(report: EstimateReport, console: Console | None = None) -> None:
    console = console or Console()
    model = report.model
    console.print(f"[bold]{report.plan}[/]: {model['source']} — {model['params']:,} parameters, "
                  f"{model['layers']} layers, hidden {model['hidden']}, {model['heads']}/{model['kv_heads']} "
                  f"heads, vocab {model['vocab']}")
    columns = _columns(report)
    memory = Table(title="Memory by device")
    for header in ("device", "settings", "capacity", "weights", "KV cache", "activations", "runtime",
                   "total"):
        memory.add_column(header, justify="left" if header in ("device", "settings") else "right")
    for name, first in columns[0][1].memory["by_device"].items():
        for index, (title, current) in enumerate(columns):
            device = current.memory["by_device"][name]
            total = size(device["total_bytes"])
            memory.add_row(name if index == 0 else "", title, size(first["capacity_bytes"]) if index == 0 else "",
                           size(device["weights_bytes"]), size(device["kv_cache_bytes"]),
                           size(device["activations_bytes"]), size(device["runtime_bytes"]),
                           total if device["fits"] else f"[red]{total} (too big)[/]")
    console.print(memory)
    if report.training is None:
        _render_time(console, columns)
    else:
        _render_training(console, columns)
    for note in report.notes:
        console.print(f"[yellow]note[/]: {note}")


def _render_time(console: Console, columns: list[tuple[str, EstimateReport]]) -> None:
    table = Table(title="Time by phase and component")
    table.add_column("")
    for title, _ in columns:
        table.add_column(f"prefill\n{title}", justify="right")
        table.add_column(f"per token\n{title}", justify="right")
    components = list(columns[0][1].latency["by_component"])
    for component in components:
        row = [component]
        for _, current in columns:
            part = current.latency["by_component"].get(component, {})
            row += [seconds(part.get("prefill_s")), seconds(part.get("token_s"))]
        table.add_row(*row)
    row = ["[bold]total[/]"]
    for _, current in columns:
        row += [seconds(current.latency["prefill_s"]), seconds(current.latency["token_s"])]
    table.add_row(*row)
    console.print(table)
    summary = Table(title="Per request")
    summary.add_column("")
    for title, _ in columns:
        summary.add_column(title, justify="right")
    summary.add_row("request", *[seconds(c.latency["request_s"]) for _, c in columns])
    summary.add_row("throughput", *[f"{c.throughput_tok_s:,.1f} tok/s" if c.throughput_tok_s else "-"
                                    for _, c in columns])
    summary.add_row("quality (ppl)", *[f"+{c.quality['perplexity_increase']:.2%} ({c.quality['source']})"
                                       for _, c in columns])
    summary.add_row("price", *[f"${c.cost_per_h:,.2f}/h" for _, c in columns])
    console.print(summary)


def _render_training(console: Console, columns: list[tuple[str, EstimateReport]]) -> None:
    table = Table(title="Training")
    table.add_column("")
    for title, _ in columns:
        table.add_column(title, justify="right")
    rows = [("ZeRO stage", lambda t: str(t["zero_stage"])), ("data parallel", lambda t: str(t["data_parallel"])),
            ("model states / rank", lambda t: size(t["model_states_bytes"])),
            ("activations / rank", lambda t: size(t["activations_bytes"])),
            ("compute C", lambda t: f"{t['flops']:.3e} FLOP"), ("time T", lambda t: seconds(t["time_s"]))]
    for label, show in rows:
        table.add_row(label, *[show(c.training) for _, c in columns])
    console.print(table)
    stages = Table(title="Model states per rank by ZeRO stage")
    stages.add_column("stage")
    stages.add_column("bytes", justify="right")
    for entry in columns[-1][1].training["by_zero_stage"]:
        stages.add_row(str(entry["stage"]), size(entry["model_states_bytes"]))
    console.print(stages)
