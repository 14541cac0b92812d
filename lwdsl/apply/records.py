"""What each layer became: the record the driver writes, the manifest stores and `load` rebuilds from.

A record is read off the live module (its class, shape, format, storage), not copied from the
choice, so that a handler that silently did less than asked cannot go unnoticed. Imports no torch.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from lwdsl.solution import LayerChoice, PruneChoice, QuantFormat

Kind = Literal["linear", "quantized", "cast", "sparse24", "embedding"]
Storage = Literal["resident", "disk", "host"]


class LayerRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Kind
    shape: tuple[int, int]  # (out, in) as stored (after structured prunes)
    original_shape: tuple[int, int]
    format: QuantFormat = QuantFormat()
    prune: PruneChoice = PruneChoice()
    storage: Storage = "resident"  # resident: in the main weights file; disk: streamed from offload file
    stored_bytes: int = 0  # codes + scales (+ offsets) + sparse metadata: what the cost model counts
    values_kind: Kind | None = None  # sparse24 only: how the kept values are stored
    bias: bool = False
    kernel: str | None = None
    note: str | None = None


def _kind(module) -> Kind:
    from torch import nn

    if isinstance(module, nn.Embedding):  # Gemma 3's scaled embedding is one too
        return "embedding"
    name = type(module).__name__
    return {"QuantizedLinear": "quantized", "CastLinear": "cast", "Sparse24Linear": "sparse24",
            "Embedding": "embedding"}.get(name, "linear")


def module_bytes(module) -> int:
    """Bytes of the stored weight of a linear-like module (bias and norms excluded)."""
    if hasattr(module, "weight_bytes"):
        return int(module.weight_bytes())
    weight = module.weight
    return weight.numel() * weight.element_size()


def describe(name: str, module, choice: LayerChoice, original_shape: tuple[int, ...], storage: Storage) -> LayerRecord:
    """The record of `module` as it now is (see the module docstring)."""
    kind = _kind(module)
    inner = module.values if kind == "sparse24" else module
    fmt = getattr(inner, "fmt", None) or QuantFormat()
    if kind == "sparse24":
        shape = (module.out_features, module.in_features)
    else:
        shape = tuple(module.weight.shape) if hasattr(module, "weight") else (module.out_features, module.in_features)
    prune = PruneChoice()
    note = None
    if kind == "sparse24":
        prune = PruneChoice(kind="2:4", fraction=0.5)
        note = "2:4: kept values + 2-bit positions; computed through a dense rebuild (no sparse kernel here)"
    elif getattr(module, "sparsity", None) is not None:
        prune = PruneChoice(kind="unstructured", fraction=module.sparsity)
        note = "unstructured mask stored dense: zeros in place, no bytes saved"
    elif tuple(shape) != tuple(original_shape):
        prune = choice.prune
    return LayerRecord(name=name, kind=kind, shape=shape, original_shape=tuple(original_shape), format=fmt,
                       prune=prune, storage=storage, stored_bytes=module_bytes(module),
                       values_kind=_kind(module.values) if kind == "sparse24" else None,
                       bias=getattr(module, "bias", None) is not None,
                       kernel=getattr(inner, "kernel", None), note=note)
