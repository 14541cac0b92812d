"""Which (format, prune) options `profile` measures on which layer — what the plan's `allow` permits.

Per linear layer (not matched by `keep`): every allowed weight format that can store it, every
allowed prune level alone (in fp32), and every level combined with every format, so each choice
the solver can make has its own measured entry. A `within` block adds its techniques to the
modules it selects. Prune levels: `prune channels up to P%` is profiled at P/2 and P.

    >>> layer_options(plan, inventory)["model.layers.0.mlp.down_proj"][:2]      # doctest: +SKIP
    [(QuantFormat(dtype='int8', ...), PruneChoice(kind='none', ...)), ...]
"""
from __future__ import annotations

import fnmatch

from lwdsl import ast
from lwdsl.cost.formats import format_applies
from lwdsl.solution import PruneChoice, QuantFormat

Option = tuple[QuantFormat, PruneChoice]
PRUNE_ROLES = {"channels": ("mlp_gate", "mlp_up", "mlp_down"),
               "heads": ("attn_q", "attn_k", "attn_v", "attn_o")}
PRUNE_FRACTIONS = (0.5, 1.0)  # of the plan's `up to P%`


def _matches(selector: ast.Selector, module: str) -> bool:
    return fnmatch.fnmatchcase(module, selector.pattern) if selector.quoted or any(
        c in selector.pattern for c in "*?[") else module == selector.pattern


def _collect(techniques, module: str, formats: list[QuantFormat], prunes: list[PruneChoice],
             kept: list[bool]) -> None:
    for technique in techniques:
        if isinstance(technique, ast.QuantizeWeights):
            for node in technique.formats:
                fmt = QuantFormat(dtype=node.dtype, group=node.group, symmetric=node.symmetric)
                if fmt not in formats:
                    formats.append(fmt)
        elif isinstance(technique, ast.Prune):
            if technique.kind == "2:4":
                levels = [PruneChoice(kind="2:4", fraction=0.5)]
            else:
                top = technique.up_to.value if technique.up_to else 0.0
                levels = [PruneChoice(kind=technique.kind, fraction=round(top * f, 4)) for f in PRUNE_FRACTIONS]
            prunes.extend(p for p in levels if p.fraction > 0 and p not in prunes)
        elif isinstance(technique, ast.Keep):
            if any(_matches(s, module) for s in technique.selectors):
                kept.append(True)
        elif isinstance(technique, ast.Within) and _matches(technique.selector, module):
            _collect(technique.techniques, module, formats, prunes, kept)


def _prune_applies(prune: PruneChoice, role: str) -> bool:
    return prune.kind in ("unstructured", "2:4") or role in PRUNE_ROLES.get(prune.kind, ())


def layer_options(plan: ast.Plan, inventory) -> dict[str, list[Option]]:
    """Options to profile per linear module name, in a fixed order (deterministic profiles)."""
    result: dict[str, list[Option]] = {}
    for weight in inventory.linear_layers():
        if weight.is_bias:
            continue
        formats: list[QuantFormat] = []
        prunes: list[PruneChoice] = []
        kept: list[bool] = []
        _collect(plan.allow.techniques, weight.module, formats, prunes, kept)
        if kept:
            continue
        usable = [f for f in formats if f.dtype != "fp32" and format_applies(tuple(weight.shape), f) is None]
        levels = [p for p in prunes if _prune_applies(p, weight.role)]
        options: list[Option] = [(f, PruneChoice()) for f in usable]
        for level in levels:
            options.append((QuantFormat(), level))
            options.extend((f, level) for f in usable)
        if options:
            result[weight.module] = options
    return result


def option_label(option: Option) -> str:
    fmt, prune = option
    parts = [fmt.label()]
    if prune.kind != "none":
        parts.append(f"prune {prune.kind} {prune.fraction:.0%}")
    return " + ".join(parts)
