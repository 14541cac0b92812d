"""The allow-list is coherent: `within` narrows per-module techniques only, a format is listed once
per list, and `keep` inside `within` is said once (E280, E281)."""
from __future__ import annotations

from lwdsl import ast
from lwdsl.errors import Diagnostic
from lwdsl.semantics.context import Context, error, walk_techniques

# Techniques that act on the whole run, never on a subset of modules.
GLOBAL_TECHNIQUES = (ast.Shard, ast.Zero, ast.Checkpoint, ast.Accumulate, ast.OffloadOptimizer)
WORDS = {ast.Shard: "shard", ast.Zero: "zero", ast.Checkpoint: "checkpoint activations",
         ast.Accumulate: "accumulate", ast.OffloadOptimizer: "offload optimizer"}


def _format_text(fmt: ast.Format) -> str:
    return " ".join([fmt.dtype] + ([f"group {fmt.group}"] if fmt.group else []) + ([] if fmt.symmetric else ["asymmetric"]))


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    for technique, within in walk_techniques(plan.allow.techniques):
        if within is not None and isinstance(technique, GLOBAL_TECHNIQUES):
            found.append(error("E280", f"`{WORDS[type(technique)]}` applies to the whole run, not inside `within`",
                               technique.span, "move it to the top level of `allow`"))
        if isinstance(technique, (ast.QuantizeWeights, ast.QuantizeKV)):
            seen: set[str] = set()
            for fmt in technique.formats:
                text = _format_text(fmt)
                if text in seen:
                    found.append(error("E281", f"format `{text}` is listed twice", fmt.span, "list each format once"))
                seen.add(text)
    return found
