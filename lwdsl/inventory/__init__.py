"""Model source -> inventory: every weight (name, shape, role, block, tie) and the architecture numbers.

    inventory = load_inventory(plan.model, base_dir)
    inventory.params(), inventory.linear_layers(), inventory.module_names()

Never loads a tensor: planning a 405B model needs only its config.
"""
from __future__ import annotations

from pathlib import Path

from lwdsl.inventory.records import LINEAR_ROLES, ArchNumbers, Inventory, Role, Weight
from lwdsl.inventory.sources import architecture_entry, architecture_ids, build, hf_name, load

__all__ = ["ArchNumbers", "Inventory", "LINEAR_ROLES", "Role", "Weight", "architecture_entry",
           "architecture_ids", "build", "hf_name", "load_inventory"]


def load_inventory(block, base_dir: Path) -> Inventory:
    """The inventory of a plan's `model` block (`lwdsl.ast.ModelBlock`); LwdslError E3xx when unusable.

    >>> from lwdsl.ast import ModelBlock
    >>> load_inventory(ModelBlock(source="arch:gpt2", scheme="arch", location="gpt2"), Path(".")).params()
    124439808
    """
    return load(block.source, block.scheme, block.location, Path(base_dir), block.span)
