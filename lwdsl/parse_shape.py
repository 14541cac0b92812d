"""The transformer from Lark's tree into `ast` nodes. It only shapes: values become typed fields,
quantities are normalised (`lwdsl.units`), counts become integers, and a block or property given twice
is reported. Problems are collected in `diagnostics`, never raised one by one."""
from __future__ import annotations

import re
from typing import Any

from lark import Token, Tree

from lwdsl import ast
from lwdsl.errors import Diagnostic, LwdslError, Span
from lwdsl.units import quantity_from_text, whole_number

MODEL_SCHEMES = ("hf", "gguf", "arch", "config")
_ESCAPE = re.compile(r"\\(.)")


def unquote(token: str) -> str:
    return _ESCAPE.sub(r"\1", token[1:-1])


class Shaper:
    """`Shaper(file, comments).transform(tree)`: each rule `r` of the grammar is the method `r(meta, *children)`,
    called bottom-up (a plain walk: lark's Transformer wraps every call, which costs a third of the parse)."""

    def __init__(self, file: str, comments: tuple[ast.Comment, ...] = ()):
        self.file = file
        self.comments = comments
        self.diagnostics: list[Diagnostic] = []
        self.block_spans: dict[str, Span] = {}  # layout the AST does not hold (the `require { }` braces), for fmt

    def transform(self, tree: Tree):
        children = [self.transform(child) if isinstance(child, Tree) else child for child in tree.children]
        return getattr(self, tree.data)(tree.meta, *children)

    # --- helpers --------------------------------------------------------------------------------
    # Spans are built from lark's integer positions: nothing to validate (model_construct is 3x faster).
    def _span(self, meta) -> Span:
        return Span.model_construct(file=self.file, line=meta.line, column=meta.column, end_line=meta.end_line,
                                    end_column=meta.end_column)

    def _token_span(self, token: Token) -> Span:
        return Span.model_construct(file=self.file, line=token.line, column=token.column, end_line=token.end_line,
                                    end_column=token.end_column)

    def _error(self, code: str, message: str, span: Span, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code=code, message=message, span=span, hint=hint))

    def _quantity(self, token: Token) -> ast.Quantity:
        try:
            return quantity_from_text(str(token), self._token_span(token))
        except LwdslError as error:
            self.diagnostics.extend(error.diagnostics)
            return ast.Quantity(value=1.0, kind="number", text="1", span=self._token_span(token))

    def _count(self, token: Token, what: str) -> int:
        quantity = self._quantity(token)
        value = whole_number(quantity)
        if value is not None:
            return value
        if quantity.kind == "number" and quantity.text.startswith("-") and quantity.value.is_integer():
            return int(quantity.value)  # a negative whole number: the range check says why it is wrong
        self._error("E105", f"expected a whole number such as `8` for {what}, found `{quantity.text}`",
                    quantity.span, hint="counts are plain numbers without a unit" if quantity.unit else None)
        return 1

    def _once(self, seen: dict[str, Span], key: str, span: Span, what: str) -> bool:
        if key in seen:
            self._error("E201", f"{what} given twice (first at line {seen[key].line})", span,
                        hint="write it once")
            return False
        seen[key] = span
        return True

    # --- plan ----------------------------------------------------------------------------------------
    def start(self, meta, plan):
        return plan

    def plan(self, meta, name, *blocks):
        span = self._span(meta)
        fields: dict[str, Any] = {}
        seen: dict[str, Span] = {}
        for key, value, block_span in blocks:  # each block method returns (field, value, span)
            if self._once(seen, key, block_span, f"the `{_BLOCK_WORD[key]}` block"):
                fields[key] = value
        missing = [key for key in ("model", "target") if key not in fields]
        for key in missing:
            self._error("E202", f"plan `{name}` has no `{key}` block", self._token_span(name),
                        hint=_MISSING_HINT[key])
        if missing:
            return None
        return ast.Plan(name=str(name), span=span, comments=self.comments, **fields)

    # --- model ---------------------------------------------------------------------------------------
    def model(self, meta, source, body=None):
        text = unquote(source)
        scheme, _, location = text.partition(":")
        if scheme not in MODEL_SCHEMES or not location:
            self._error("E204", f"expected a model source such as `\"gguf:FILE\"`, found `{source}`",
                        self._token_span(source),
                        hint="a source starts with `hf:`, `gguf:`, `arch:` or `config:`")
            scheme, location = "arch", location or text
        span = self._span(meta)
        return "model", ast.ModelBlock(source=text, scheme=scheme, location=location, span=span, **(body or {})), span

    def model_body(self, meta, *sources):
        fields: dict[str, ast.TextSource] = {}
        seen: dict[str, Span] = {}
        for role, source in sources:
            if self._once(seen, role, source.span, f"`{role}`"):
                fields[role] = source
        return fields

    def text_source(self, meta, role, source, tokens=None):
        role, text = str(role), unquote(source)
        if not text.startswith("text:") or text == "text:":
            self._error("E205", f"expected a text source such as `\"text:FILE\"`, found `{source}`",
                        self._token_span(source), hint='write "text:FILE" or the built-in "text:python-docs"')
        count = self._count(tokens, "`tokens`") if tokens is not None else None
        return role, ast.TextSource(source=text, tokens=count, span=self._span(meta))

    # --- target --------------------------------------------------------------------------------------
    def target(self, meta, *items):
        name = None
        if items and isinstance(items[0], Token):
            name, items = str(items[0]), items[1:]
        devices = tuple(item for item in items if isinstance(item, ast.Device))
        links = tuple(item for item in items if isinstance(item, ast.Link))
        switches = tuple(item for item in items if isinstance(item, ast.Switch))
        span = self._span(meta)
        return "target", ast.Target(name=name, devices=devices, links=links, switches=switches, span=span), span

    def device(self, meta, name, *rest):
        catalog = None
        count = None
        props: dict[str, ast.Quantity] = {}
        if rest and isinstance(rest[0], tuple):  # `device gpu[8] ...`: a group
            count, rest = rest[0][1], rest[1:]
        kind, rest = rest[0], rest[1:]
        for item in rest:
            if isinstance(item, Token):
                catalog = unquote(item)
            else:
                props = item
        return ast.Device(name=str(name), kind=str(kind), catalog=catalog, count=count, span=self._span(meta),
                          **props)

    def device_count(self, meta, count):
        return "count", self._count(count, "a device group's size")

    def switch_latency(self, meta, value):
        return self._quantity(value)

    def ref_one(self, meta, name):
        return str(name)

    def ref_all(self, meta, name):
        return f"{name}[*]"

    def ref_range(self, meta, name, first, last):
        return f"{name}[{self._count(first, 'a range of devices')}..{self._count(last, 'a range of devices')}]"

    def switch(self, meta, name, *rest):
        members = tuple(item for item in rest if isinstance(item, str) and not isinstance(item, Token))
        rate = next((self._quantity(item) for item in rest if isinstance(item, Token)), None)
        latency = next((item for item in rest if isinstance(item, ast.Quantity)), None)
        return ast.Switch(name=str(name), devices=members, rate=rate, latency=latency, span=self._span(meta))

    def device_body(self, meta, *props):
        fields: dict[str, ast.Quantity] = {}
        seen: dict[str, Span] = {}
        for prop, quantity in props:
            if self._once(seen, prop, quantity.span, f"`{prop}`"):
                fields[prop] = quantity
        return fields

    def device_prop(self, meta, prop, value):
        return str(prop), self._quantity(value)

    def link(self, meta, a, b, rate, latency=None):
        return ast.Link(a=a, b=b, rate=self._quantity(rate),
                        latency=self._quantity(latency) if latency is not None else None, span=self._span(meta))

    # --- workload ------------------------------------------------------------------------------------
    def _workload(self, meta, node, items):
        fields: dict[str, Any] = {}
        seen: dict[str, Span] = {}
        for key, value, span in items:
            if self._once(seen, key, span, f"`{key}`"):
                fields[key] = value
        span = self._span(meta)
        return "workload", node(span=span, **fields), span

    def inference(self, meta, *items):
        return self._workload(meta, ast.InferenceWorkload, items)

    def training(self, meta, *items):
        return self._workload(meta, ast.TrainingWorkload, items)

    def inference_item(self, meta, field, count):
        return str(field), self._count(count, f"`{field}`"), self._span(meta)

    def training_count(self, meta, field, count):
        return str(field), self._count(count, f"`{field}`"), self._span(meta)

    def training_optimizer(self, meta, value):
        return "optimizer", str(value), self._span(meta)

    def training_precision(self, meta, value):
        return "precision", str(value), self._span(meta)

    # --- require and objective -----------------------------------------------------------------------
    def require(self, meta, *constraints):
        span = self._span(meta)
        self.block_spans.setdefault("require", span)
        return "require", tuple(constraints), span

    def constraint(self, meta, metric, op, value):
        return ast.Constraint(metric=metric, op=str(op), value=self._quantity(value), span=self._span(meta))

    def metric_memory(self, meta, device=None):
        return ast.Metric(name="memory", qualifier=str(device) if device is not None else None, span=self._span(meta))

    def metric_latency(self, meta, phase=None):
        return ast.Metric(name="latency", qualifier=str(phase) if phase is not None else None, span=self._span(meta))

    def metric_quality(self, meta, measure=None):
        return ast.Metric(name="quality", qualifier=str(measure) if measure is not None else None, span=self._span(meta))

    def metric_throughput(self, meta):
        return ast.Metric(name="throughput", span=self._span(meta))

    def metric_cost(self, meta):
        return ast.Metric(name="cost", span=self._span(meta))

    def metric_time(self, meta):
        return ast.Metric(name="time", span=self._span(meta))

    def objective(self, meta, direction, metric, *then_terms):
        direction = str(direction)
        terms = [ast.ObjectiveTerm(direction=direction, metric=metric, span=metric.span)]
        for written, metric in then_terms:
            direction = written or direction
            terms.append(ast.ObjectiveTerm(direction=direction, metric=metric, span=metric.span))
        span = self._span(meta)
        return "objective", ast.Objective(terms=tuple(terms), span=span), span

    def then_term(self, meta, *parts):
        return (str(parts[0]), parts[1]) if len(parts) == 2 else (None, parts[0])

    # --- allow ---------------------------------------------------------------------------------------
    def allow(self, meta, *techniques):
        span = self._span(meta)
        return "allow", ast.Allow(techniques=tuple(techniques), span=span), span

    def quantize(self, meta, target, *formats):
        node = ast.QuantizeWeights if target == "weights" else ast.QuantizeKV
        return node(formats=tuple(formats), span=self._span(meta))

    def format(self, meta, dtype, *options):
        group = next((o for o in options if isinstance(o, int)), None)
        symmetry = next((o for o in options if isinstance(o, str)), "symmetric")
        return ast.Format(dtype=str(dtype), group=group, symmetric=symmetry == "symmetric", span=self._span(meta))

    def group(self, meta, count):
        return self._count(count, "`group`")

    def prune_up_to(self, meta, kind, value):
        return ast.Prune(kind=str(kind), up_to=self._quantity(value), span=self._span(meta))

    def prune_2_4(self, meta):
        return ast.Prune(kind="2:4", span=self._span(meta))

    def shard_up_to(self, meta, kind, count):
        return ast.Shard(kind=str(kind), up_to=self._count(count, f"`shard {kind}`"), span=self._span(meta))

    def shard_pipeline(self, meta):
        return ast.Shard(kind="pipeline", span=self._span(meta))

    def offload(self, meta, *devices):
        return ast.Offload(devices=tuple(str(d) for d in devices), span=self._span(meta))

    def offload_optimizer(self, meta, device):
        return ast.OffloadOptimizer(device=str(device), span=self._span(meta))

    def keep(self, meta, *selectors):
        return ast.Keep(selectors=tuple(selectors), span=self._span(meta))

    def within(self, meta, selector, *techniques):
        return ast.Within(selector=selector, techniques=tuple(techniques), span=self._span(meta))

    def selector(self, meta, token):
        quoted = token.type == "STRING"
        return ast.Selector(pattern=unquote(token) if quoted else str(token), quoted=quoted, span=self._span(meta))

    def zero(self, meta, low, high=None):
        first = self._count(low, "`zero`")
        return ast.Zero(low=0 if high is None else first, high=first if high is None else self._count(high, "`zero`"),
                        span=self._span(meta))

    def checkpoint(self, meta):
        return ast.Checkpoint(span=self._span(meta))

    def accumulate(self, meta, count):
        return ast.Accumulate(up_to=self._count(count, "`accumulate`"), span=self._span(meta))

    def recover(self, meta, count):
        return ast.Recover(up_to_steps=self._count(count, "`recover distill up to`"), span=self._span(meta))


_BLOCK_WORD = {"model": "model", "target": "target", "workload": "workload", "require": "require",
               "allow": "allow", "objective": "minimize/maximize"}
_MISSING_HINT = {"model": 'add `model "gguf:FILE"` (or "hf:DIR", "arch:ID", "config:FILE")',
                 "target": "add `target { device NAME cpu|gpu|disk [\"CATALOG-ID\"] { ... } }`"}
