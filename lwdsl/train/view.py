"""The human view of a training run: a progress bar with the loss, then measured vs predicted."""
from __future__ import annotations

import contextlib

from lwdsl.train.records import TrainReport


@contextlib.contextmanager
def progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("{task.fields[step_s]}"), TimeRemainingColumn())
    task = None

    def on_step(step: int, loss: float, seconds: float, total: int | None = None) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task("train", total=None, loss="", step_s="")
        bar.update(task, completed=step, loss=f"{loss:.4f}", step_s=f"{seconds:.2f} s/step")
        bar.console.print(f"step {step}: loss {loss:.4f} ({seconds:.2f} s)")

    with bar:
        yield on_step


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def render(report: TrainReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    first = report.loss[0] if report.loss else float("nan")
    last = report.loss[-1] if report.loss else float("nan")
    console.print(f"[bold]{report.plan}[/]: {report.steps} steps on {report.ranks} rank(s), ZeRO stage "
                  f"{report.zero_stage}, micro-batch {report.micro_batch} x {report.sequence} tokens, "
                  f"accumulate {report.accumulate}, checkpointing {'on' if report.checkpoint_activations else 'off'}"
                  + (f" (resumed at step {report.resumed_from})" if report.resumed_from else ""))
    console.print(f"loss {first:.4f} -> {last:.4f}")
    table = Table("figure", "measured", "predicted", "measured / predicted")
    m, p = report.measured, report.predicted
    for name, mv, pv, fmt in (("peak memory (largest rank)", m.peak_memory_bytes, p.peak_memory_bytes, _size),
                              ("step time", m.step_s, p.step_s, lambda s: f"{s:.3f} s"),
                              ("tokens/s", m.tokens_per_s, p.tokens_per_s, lambda r: f"{r:,.0f}")):
        table.add_row(name, fmt(mv), fmt(pv), f"{mv / pv:.2f}" if pv else "-")
    console.print(table)
    if p.compute_s or p.collective_s:
        console.print(f"predicted step: compute {p.compute_s:.3f} s + optimizer {p.optimizer_s:.3f} s + "
                      f"collectives {p.collective_s:.3f} s")
    if report.checkpoint:
        console.print(f"checkpoint: {report.checkpoint}")
    for note in report.notes:
        console.print(f"note: {note}")
