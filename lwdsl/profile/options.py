"""Which (format, prune) options `profile` measures on which layer — exactly what the solver may choose.

The plan's `allow` is read through the solver's own resolution (`lwdsl.solve.allowed`: `keep`,
`within` replacing the global lists, prune levels P/2 and P), so every choice the solver can make
for a linear layer has its own measured entry: each format alone, each prune level alone (in
fp32), and each level combined with each format.

    >>> layer_options(plan, inventory)["model.layers.0.mlp.down_proj"][:2]      # doctest: +SKIP
    [(QuantFormat(dtype='int8', ...), PruneChoice(kind='none', ...)), ...]
"""
from __future__ import annotations

from lwdsl import ast
from lwdsl.cost.formats import format_applies, pruned_shape
from lwdsl.solution import PruneChoice, QuantFormat

Option = tuple[QuantFormat, PruneChoice]
PRUNE_ROLES = {"channels": ("mlp_gate", "mlp_up", "mlp_down"),
               "heads": ("attn_q", "attn_k", "attn_v", "attn_o")}


def _prune_applies(prune: PruneChoice, role: str) -> bool:
    return prune.kind in ("unstructured", "2:4") or role in PRUNE_ROLES.get(prune.kind, ())


def layer_options(plan: ast.Plan, inventory) -> dict[str, list[Option]]:
    """Options to profile per linear module name, in a fixed order (deterministic profiles)."""
    from lwdsl.solve.allowed import allowance

    allowed = allowance(plan.allow.techniques)
    result: dict[str, list[Option]] = {}
    for weight in inventory.linear_layers():
        module = allowed.for_module(weight.module)
        if module.kept:
            continue
        usable = [f for f in module.formats
                  if f.dtype != "fp32" and format_applies(tuple(weight.shape), f) is None]
        levels = [p for p in module.prunes if p.kind != "none" and _prune_applies(p, weight.role)]
        options: list[Option] = [(f, PruneChoice()) for f in usable]
        for level in levels:  # a format on a pruned layer quantizes the pruned shape (as the solver offers)
            shape = pruned_shape(tuple(weight.shape), weight.role, level, inventory.arch.head_dim)
            options.append((QuantFormat(), level))
            options.extend((f, level) for f in usable if format_applies(shape, f) is None)
        if options:
            result[weight.module] = options
    return result


def option_label(option: Option) -> str:
    fmt, prune = option
    parts = [fmt.label()]
    if prune.kind != "none":
        parts.append(f"prune {prune.kind} {prune.fraction:.1%}")
    return " + ".join(parts)
