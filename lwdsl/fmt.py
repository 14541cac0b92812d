"""The canonical layout of a plan: 2-space indent, one statement a line, no `;`, comments kept.

    >>> print(format_text('plan p { model "arch:gpt2"; target { device c cpu "local" } }'), end="")
    plan p {
      model "arch:gpt2"
    <BLANKLINE>
      target {
        device c cpu "local"
      }
    }

The printer works from the AST, so `format_text(format_text(t)) == format_text(t)` and the re-parsed
plan equals the original (spans aside). Each printed line remembers the source line it came from;
a comment goes back next to the line it sat on (trailing) or before the first line after it (whole-line).
"""
from __future__ import annotations

from dataclasses import dataclass

from lwdsl import ast
from lwdsl.errors import Span
from lwdsl.parse import parse_with_layout

INDENT = "  "


@dataclass(frozen=True)
class Line:
    indent: int
    text: str
    key: int  # the source line this printed line stands for
    closing: bool = False  # a `}`: a comment before it belongs inside the block
    blank_before: bool = False


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _written(node: ast.Node) -> bool:
    return node.span.end_line is not None  # defaults carry an empty span


def metric_text(metric: ast.Metric) -> str:
    return f"{metric.name} {metric.qualifier}" if metric.qualifier else metric.name


def format_text_of(fmt: ast.Format) -> str:
    words = [fmt.dtype] + ([f"group {fmt.group}"] if fmt.group is not None else [])
    return " ".join(words + ([] if fmt.symmetric else ["asymmetric"]))


def _technique(technique, indent: int) -> list[Line]:
    key = technique.span.line
    simple = {
        ast.QuantizeWeights: lambda t: "quantize weights " + ", ".join(format_text_of(f) for f in t.formats),
        ast.QuantizeKV: lambda t: "quantize kv " + ", ".join(format_text_of(f) for f in t.formats),
        ast.Prune: lambda t: "prune 2:4" if t.kind == "2:4" else f"prune {t.kind} up to {t.up_to.text}",
        ast.Shard: lambda t: "shard pipeline" if t.kind == "pipeline" else f"shard {t.kind} up to {t.up_to}",
        ast.Offload: lambda t: "offload " + ", ".join(t.devices),
        ast.OffloadOptimizer: lambda t: f"offload optimizer {t.device}",
        ast.Keep: lambda t: "keep " + ", ".join(_selector(s) for s in t.selectors),
        ast.Zero: lambda t: f"zero {t.low}..{t.high}",
        ast.Checkpoint: lambda t: "checkpoint activations",
        ast.Accumulate: lambda t: f"accumulate up to {t.up_to}",
        ast.Recover: lambda t: f"recover {t.method} up to {t.up_to_steps} steps",
    }
    if isinstance(technique, ast.Within):
        inner = [line for t in technique.techniques for line in _technique(t, indent + 1)]
        return [Line(indent, f"within {_selector(technique.selector)} {{", key), *inner,
                Line(indent, "}", technique.span.end_line or key, closing=True)]
    return [Line(indent, simple[type(technique)](technique), key)]


def _selector(selector: ast.Selector) -> str:
    return quote(selector.pattern) if selector.quoted else selector.pattern


def _model(model: ast.ModelBlock) -> list[Line]:
    sources = [(role, s) for role, s in (("eval", model.eval), ("calibrate", model.calibrate)) if s is not None]
    if not sources:
        return [Line(1, f"model {quote(model.source)}", model.span.line)]
    body = [Line(2, f"{role} {quote(s.source)}" + (f" tokens {s.tokens}" if s.tokens is not None else ""), s.span.line)
            for role, s in sources]
    return [Line(1, f"model {quote(model.source)} {{", model.span.line), *body,
            Line(1, "}", model.span.end_line or model.span.line, closing=True)]


def _device(device: ast.Device) -> list[Line]:
    stem = f"{device.name}[{device.count}]" if device.count is not None else device.name
    head = f"device {stem} {device.kind}" + (f" {quote(device.catalog)}" if device.catalog is not None else "")
    props = [(p, getattr(device, p)) for p in ("memory", "bandwidth", "compute", "price") if getattr(device, p)]
    if not props:
        return [Line(2, head, device.span.line)]
    return [Line(2, head + " {", device.span.line), *[Line(3, f"{p} {q.text}", q.span.line) for p, q in props],
            Line(2, "}", device.span.end_line or device.span.line, closing=True)]


def _link(link: ast.Link) -> list[Line]:
    latency = f" latency {link.latency.text}" if link.latency is not None else ""
    return [Line(2, f"link {link.a} <-> {link.b} {link.rate.text}{latency}", link.span.line)]


def _switch(switch: ast.Switch) -> list[Line]:
    rate = f" {switch.rate.text}" if switch.rate is not None else ""
    latency = f" latency {switch.latency.text}" if switch.latency is not None else ""
    return [Line(2, f"switch {switch.name} {{ {', '.join(switch.devices)} }}{rate}{latency}", switch.span.line)]


_TARGET_ITEM = {ast.Device: _device, ast.Link: _link, ast.Switch: _switch}


def _target(target: ast.Target) -> list[Line]:
    items = sorted([*target.devices, *target.links, *target.switches], key=lambda n: (n.span.line, n.span.column))
    body = [line for item in items for line in _TARGET_ITEM[type(item)](item)]
    head = f"target {target.name} {{" if target.name else "target {"
    return [Line(1, head, target.span.line), *body, Line(1, "}", target.span.end_line or target.span.line, closing=True)]


def _workload(workload) -> list[Line]:
    if workload.type == "inference":
        fields = [("batch", workload.batch), ("context", workload.context), ("generate", workload.generate)]
    else:
        fields = [("batch", workload.batch), ("sequence", workload.sequence), ("tokens", workload.tokens),
                  ("optimizer", workload.optimizer), ("precision", workload.precision)]
    key = workload.span.line
    return [Line(1, f"workload {workload.type} {{", key), *[Line(2, f"{k} {v}", key) for k, v in fields],
            Line(1, "}", workload.span.end_line or key, closing=True)]


def _require(require: tuple[ast.Constraint, ...], span: Span | None) -> list[Line]:
    body = [Line(2, f"{metric_text(c.metric)} {c.op} {c.value.text}", c.span.line) for c in require]
    first, last = (span.line, span.end_line) if span and span.end_line else (require[0].span.line, require[-1].span.end_line)
    return [Line(1, "require {", first), *body, Line(1, "}", last or first, closing=True)]


def _allow(allow: ast.Allow) -> list[Line]:
    body = [line for t in allow.techniques for line in _technique(t, 2)]
    return [Line(1, "allow {", allow.span.line), *body, Line(1, "}", allow.span.end_line or allow.span.line, closing=True)]


def _objective(objective: ast.Objective) -> list[Line]:
    words, direction = [], None
    for term in objective.terms:
        part = metric_text(term.metric) if term.direction == direction else f"{term.direction} {metric_text(term.metric)}"
        words.append(part)
        direction = term.direction
    return [Line(1, " then ".join(words), objective.span.line)]


def plan_lines(plan: ast.Plan, block_spans: dict[str, Span] | None = None) -> list[Line]:
    """The plan as printed lines, blocks in the order they were written (`block_spans` from
    `parse_with_layout` place comments inside `require { }` exactly; without them, near it)."""
    block_spans = block_spans or {}
    blocks: list[tuple[int, list[Line]]] = [(plan.model.span.line, _model(plan.model)),
                                            (plan.target.span.line, _target(plan.target))]
    if _written(plan.workload):
        blocks.append((plan.workload.span.line, _workload(plan.workload)))
    if plan.require or "require" in block_spans:
        require = _require(plan.require, block_spans.get("require"))
        blocks.append((require[0].key, require))
    if _written(plan.allow):
        blocks.append((plan.allow.span.line, _allow(plan.allow)))
    if plan.objective is not None:
        blocks.append((plan.objective.span.line, _objective(plan.objective)))
    lines = [Line(0, f"plan {plan.name} {{", plan.span.line)]
    for number, (_, block) in enumerate(sorted(blocks, key=lambda b: b[0])):
        first = block[0]
        lines.append(Line(first.indent, first.text, first.key, first.closing, blank_before=number > 0))
        lines += block[1:]
    lines.append(Line(0, "}", plan.span.end_line or plan.span.line, closing=True))
    return lines


def render(lines: list[Line], comments: tuple[ast.Comment, ...], source: str | None = None) -> str:
    """Printed lines with the comments put back: trailing ones on their line, whole-line ones before
    the first printed line that came after them."""
    source_lines = source.split("\n") if source is not None else []
    before: dict[int, list[str]] = {}
    trailing: dict[int, str] = {}
    for comment in sorted(comments, key=lambda c: (c.span.line, c.span.column)):
        line_no, column = comment.span.line, comment.span.column
        has_code = 0 < line_no <= len(source_lines) and source_lines[line_no - 1][: column - 1].strip() != ""
        index = None
        if has_code:
            same = [i for i, line in enumerate(lines) if line.key == line_no]
            earlier = [i for i, line in enumerate(lines) if line.key <= line_no]
            index = same[-1] if same else (earlier[-1] if earlier else None)
        if index is not None and index not in trailing:
            trailing[index] = comment.text
            continue
        if index is None:
            index = next((i for i, line in enumerate(lines) if line.key > line_no), len(lines))
        else:
            index += 1  # a second trailing comment on one printed line goes on its own line after it
        before.setdefault(index, []).append(comment.text)
    out: list[str] = []
    for index, line in enumerate(lines):
        if line.blank_before:
            out.append("")
        indent = INDENT * (line.indent + (1 if line.closing else 0))
        out += [f"{indent}#{text}" for text in before.get(index, [])]
        text = INDENT * line.indent + line.text
        out.append(f"{text} #{trailing[index]}" if index in trailing else text)
    out += [f"#{text}" for text in before.get(len(lines), [])]
    return "\n".join(out) + "\n"


def format_plan(plan: ast.Plan, source: str | None = None, block_spans: dict[str, Span] | None = None) -> str:
    """The canonical text of a parsed plan (give the source to tell trailing comments from whole-line ones)."""
    return render(plan_lines(plan, block_spans), plan.comments, source)


def format_text(text: str, file: str = "<plan>") -> str:
    """Parse (syntax only) and print canonically; LwdslError when the text does not parse."""
    plan, block_spans = parse_with_layout(text, file)
    return format_plan(plan, text, block_spans)
