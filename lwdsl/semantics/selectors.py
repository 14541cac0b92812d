"""Selectors match modules of the model (`keep`, `within`): a name matches itself, a quoted glob
matches by fnmatch over the module names of the model's Hugging Face implementation (E260)."""
from __future__ import annotations

import difflib
import fnmatch
import re

from lwdsl import ast
from lwdsl.errors import Diagnostic
from lwdsl.semantics.context import Context, error, walk_techniques


def selectors(plan: ast.Plan):
    for technique, _ in walk_techniques(plan.allow.techniques):
        if isinstance(technique, ast.Keep):
            yield from technique.selectors
        elif isinstance(technique, ast.Within):
            yield technique.selector


def matches(selector: ast.Selector, modules: list[str], module_set: frozenset[str]) -> bool:
    if not selector.quoted or not any(ch in selector.pattern for ch in "*?["):
        return selector.pattern in module_set
    pattern = re.compile(fnmatch.translate(selector.pattern))
    return any(pattern.match(name) for name in modules)


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    if context.inventory is None:
        return []
    modules = context.inventory.module_names()
    module_set = frozenset(modules)
    found: list[Diagnostic] = []
    verdicts: dict[tuple[str, bool], bool] = {}
    for selector in selectors(plan):
        key = (selector.pattern, selector.quoted)
        if key not in verdicts:
            verdicts[key] = matches(selector, modules, module_set)
        if verdicts[key]:
            continue
        stem = selector.pattern.replace("*", "0").replace("?", "0")
        close = difflib.get_close_matches(stem, modules, n=3, cutoff=0.5)
        hint = (f"close names: {', '.join(f'`{c}`' for c in close)}" if close
                else f"module names look like `{modules[-1] if modules else 'lm_head'}`")
        found.append(error("E260", f"`{selector.pattern}` matches no module of the model", selector.span, hint))
    return found
