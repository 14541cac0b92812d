"""Render a `CheckReport`: a rich table for people, JSON for tools, JUnit XML for CI, Markdown for PRs.

All four show the same object; none computes anything. In JUnit each `require` line is a test case
named after its plan line (`plan.lwp:14 memory cpu0 <= 150 MiB`), so a CI page points at the line
that failed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from xml.etree import ElementTree

from lwdsl.verify.records import CheckReport, RequirementResult

_UNIT_FACTORS = {
    "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
    "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3, "TiB": 1024 ** 4,
    "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600,
    "%": 0.01, "tok/s": 1, "$/h": 1,
}


def in_unit(value: float | None, unit: str) -> str:
    """`value` (base units) written in `unit`: in_unit(0.0123, "ms") -> "12.3 ms"."""
    if value is None:
        return "—"
    factor = _UNIT_FACTORS.get(unit, 1)
    scaled = value / factor
    text = f"{scaled:+.2f}" if unit == "%" else (f"{scaled:.3g}" if abs(scaled) < 100 else f"{scaled:.1f}")
    return f"{text}{unit}" if unit == "%" else f"{text} {unit}".rstrip()


def _margin_text(result: RequirementResult) -> str:
    if result.margin is None:
        return "—"
    relative = f" ({result.margin_relative:+.0%})" if result.margin_relative is not None else ""
    return f"{in_unit(result.margin, result.unit)}{relative}"


def _rows(report: CheckReport) -> list[list[str]]:
    return [[f"{r.line}", r.text, in_unit(r.required, r.unit), in_unit(r.predicted, r.unit),
             in_unit(r.measured, r.unit), _margin_text(r), "pass" if r.passed else "FAIL"]
            for r in report.requirements]


_HEADER = ["line", "requirement", "required", "predicted", "measured", "margin", "verdict"]


def print_report(report: CheckReport, console=None) -> None:
    """The human report: requirements table, predictions vs measurements, baseline, verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"lwdsl check — plan {report.plan}")
    for column in _HEADER:
        table.add_column(column, justify="left" if column == "requirement" else "right")
    for row, result in zip(_rows(report), report.requirements):
        style = "green" if result.passed else "bold red"
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/{style}]")
    console.print(table)
    if report.predictions:
        predictions = Table(title="predicted vs measured")
        for column in ("metric", "predicted", "measured", "error"):
            predictions.add_column(column, justify="right")
        for p in report.predictions:
            unit = _display_unit(p.metric)
            predictions.add_row(p.metric, in_unit(p.predicted, unit), in_unit(p.measured, unit),
                                f"{p.error_relative:+.1%}")
        console.print(predictions)
    base, art = report.baseline, report.measured
    console.print(
        f"original: memory {in_unit(base.memory_total_bytes, 'MiB')}, token "
        f"{in_unit(base.token_s, 'ms')}, perplexity {base.perplexity or 0:.3f} | artifact: memory "
        f"{in_unit(art.memory_total_bytes, 'MiB')}, token {in_unit(art.token_s, 'ms')}, perplexity "
        f"{art.perplexity or 0:.3f}, KL {art.kld or 0:.4f} nats "
        f"({report.settings.eval_tokens} eval tokens of {report.settings.eval_source})"
        + (f"; decode steps: {art.decode_step}" if art.decode_step else ""))
    for note in report.notes:
        console.print(f"note: {note}")
    verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    failed = [r for r in report.requirements if not r.passed]
    console.print(f"{verdict}: {len(report.requirements) - len(failed)}/{len(report.requirements)} "
                  "requirements hold" + "".join(f"\n  {report.plan_file}:{r.line}: {r.text}"
                                                for r in failed))


def _display_unit(metric: str) -> str:
    if metric.startswith("memory"):
        return "MiB"
    if metric.startswith("latency"):
        return "ms"
    if metric == "throughput":
        return "tok/s"
    if metric == "quality perplexity":
        return "%"
    return ""


def to_json(report: CheckReport) -> str:
    return report.model_dump_json(indent=2) + "\n"


def to_junit(report: CheckReport) -> str:
    """A JUnit XML testsuite, one testcase per `require` line, named `FILE:LINE TEXT`."""
    failures = sum(not r.passed for r in report.requirements)
    suite = ElementTree.Element("testsuite", name=f"lwdsl check {report.plan}",
                                tests=str(len(report.requirements)), failures=str(failures), errors="0")
    for result in report.requirements:
        case = ElementTree.SubElement(suite, "testcase", classname=f"lwdsl.{report.plan}",
                                      name=f"{report.plan_file}:{result.line} {result.text}",
                                      file=report.plan_file, line=str(result.line))
        detail = (f"required {result.op} {in_unit(result.required, result.unit)}; measured "
                  f"{in_unit(result.measured, result.unit)}; predicted {in_unit(result.predicted, result.unit)}")
        if not result.passed:
            failure = ElementTree.SubElement(
                case, "failure", message=f"{report.plan_file}:{result.line}: `{result.text}` not met: {detail}")
            failure.text = detail + (f"\n{result.note}" if result.note else "")
        else:
            ElementTree.SubElement(case, "system-out").text = detail
    ElementTree.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(suite, encoding="unicode") + "\n"


def to_markdown(report: CheckReport) -> str:
    lines = [f"### lwdsl check: `{report.plan}` — {'PASSED' if report.passed else 'FAILED'}", "",
             "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _rows(report)]
    if report.predictions:
        lines += ["", "| prediction | predicted | measured | error |", "|---|---|---|---|"]
        for p in report.predictions:
            unit = _display_unit(p.metric)
            lines.append(f"| {p.metric} | {in_unit(p.predicted, unit)} | {in_unit(p.measured, unit)} "
                         f"| {p.error_relative:+.1%} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: never half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
