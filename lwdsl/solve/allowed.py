"""What a plan allows each module: formats, prune levels, offload devices, sharding, KV formats.

`allow` is global; `within SELECTOR { ... }` is a narrower allow-list for the modules it matches
(its quantize / prune lines replace the global ones there); `keep` leaves a module exactly as it is.
A selector naming a module also covers the modules inside it (`model.layers.0` covers its q_proj).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from lwdsl import ast
from lwdsl.solution import PruneChoice, QuantFormat

AS_LOADED = QuantFormat()
NO_PRUNE = PruneChoice()
PRUNE_STEPS = (0.5, 1.0)  # levels offered per `prune ... up to P%`: P/2 and P (and none)


@dataclass(frozen=True)
class ModuleAllowance:
    formats: tuple[QuantFormat, ...] = (AS_LOADED,)
    prunes: tuple[PruneChoice, ...] = (NO_PRUNE,)
    kept: bool = False


@dataclass(frozen=True)
class Allowance:
    """The plan's allow block, resolved per module by `for_module`."""

    formats: tuple[QuantFormat, ...] = (AS_LOADED,)
    prunes: tuple[PruneChoice, ...] = (NO_PRUNE,)
    kv_formats: tuple[QuantFormat, ...] = (AS_LOADED,)
    offload: tuple[str, ...] = ()
    tensor_up_to: int = 1
    pipeline: bool = False
    keep: tuple[str, ...] = ()
    within: tuple[tuple[str, "Allowance"], ...] = ()
    zero: tuple[int, ...] = (0,)
    checkpoint: bool = False
    accumulate_up_to: int = 1
    data_up_to: int = 1
    offload_optimizer: tuple[str, ...] = ()
    recover_up_to: int = 0  # `recover distill up to N steps`

    def for_module(self, name: str) -> ModuleAllowance:
        if any(selects(pattern, name) for pattern in self.keep):
            return ModuleAllowance(kept=True)
        for pattern, inner in self.within:
            if selects(pattern, name):
                if any(selects(p, name) for p in inner.keep):
                    return ModuleAllowance(kept=True)
                return ModuleAllowance(formats=inner.formats, prunes=inner.prunes)
        return ModuleAllowance(formats=self.formats, prunes=self.prunes)


def selects(pattern: str, name: str) -> bool:
    return (name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(name, pattern + ".*"))


def _format(node: ast.Format) -> QuantFormat:
    return QuantFormat(dtype=node.dtype, group=node.group, symmetric=node.symmetric)


def _unique(items):
    return tuple(dict.fromkeys(items))


def _prune_levels(node: ast.Prune) -> list[PruneChoice]:
    if node.kind == "2:4":
        return [PruneChoice(kind="2:4", fraction=0.5)]
    top = node.up_to.value if node.up_to else 0.0
    return [PruneChoice(kind=node.kind, fraction=round(top * step, 6)) for step in PRUNE_STEPS if top * step > 0]


def allowance(techniques) -> Allowance:
    """The allowance of one list of techniques (the plan's `allow`, or a `within` block)."""
    formats, prunes, kv, offload, keep, within = [AS_LOADED], [NO_PRUNE], [AS_LOADED], [], [], []
    values: dict = {}
    for technique in techniques:
        if isinstance(technique, ast.QuantizeWeights):
            formats += [_format(f) for f in technique.formats]
        elif isinstance(technique, ast.QuantizeKV):
            kv += [_format(f) for f in technique.formats]
        elif isinstance(technique, ast.Prune):
            prunes += _prune_levels(technique)
        elif isinstance(technique, ast.Offload):
            offload += list(technique.devices)
        elif isinstance(technique, ast.Keep):
            keep += [s.pattern for s in technique.selectors]
        elif isinstance(technique, ast.Within):
            within.append((technique.selector.pattern, allowance(technique.techniques)))
        elif isinstance(technique, ast.Shard):
            if technique.kind == "tensor":
                values["tensor_up_to"] = max(values.get("tensor_up_to", 1), technique.up_to or 1)
            elif technique.kind == "pipeline":
                values["pipeline"] = True
            else:
                values["data_up_to"] = max(values.get("data_up_to", 1), technique.up_to or 1)
        elif isinstance(technique, ast.Zero):
            values["zero"] = tuple(range(technique.low, technique.high + 1))
        elif isinstance(technique, ast.Checkpoint):
            values["checkpoint"] = True
        elif isinstance(technique, ast.Accumulate):
            values["accumulate_up_to"] = technique.up_to
        elif isinstance(technique, ast.OffloadOptimizer):
            values["offload_optimizer"] = values.get("offload_optimizer", ()) + (technique.device,)
        elif isinstance(technique, ast.Recover):
            values["recover_up_to"] = max(values.get("recover_up_to", 0), technique.up_to_steps)
    return Allowance(formats=_unique(formats), prunes=_unique(prunes), kv_formats=_unique(kv),
                     offload=_unique(offload), keep=tuple(keep), within=tuple(within), **values)


def label(fmt: QuantFormat, prune: PruneChoice) -> str:
    text = fmt.label()
    if prune.kind != "none":
        text += f" / {prune.kind}" + (f" {prune.fraction * 100:g}%" if prune.kind != "2:4" else "")
    return text
