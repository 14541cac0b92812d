"""`lwdsl estimate`: the cost model's figures for a plan's model, as it is or with given settings.

    report = estimate(plan, base_dir, parse_settings(["weights=int4 group 128", "kv=int8"]))

No solver: every linear layer gets the same settings (a format that cannot apply to a layer leaves
it as it was, and the report says which), `keep` selectors are respected, everything sits on the
first compute device. The report is the stable JSON contract documented in the README
("estimate JSON").
"""
from __future__ import annotations

import fnmatch
import re

from pydantic import BaseModel, ConfigDict, Field

from lwdsl import ast
from lwdsl.cost import breakdown, default_choices, training_breakdown
from lwdsl.errors import fail
from lwdsl.hardware import ResolvedTarget, resolve_target
from lwdsl.inventory import Inventory, load_inventory
from lwdsl.solution import DeviceMemory, LayerChoice, Predicted, PruneChoice, QuantFormat

SCHEMA_VERSION = "lwdsl.estimate/1"


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Settings(Record):
    """What `--with` asks for; None/defaults mean the model as it is."""

    weights: QuantFormat | None = None
    kv: QuantFormat | None = None
    prune: PruneChoice | None = None
    tensor_parallel: int = 1
    zero: int = 0
    checkpoint: bool = False
    accumulate: int = 1
    data: int = 1
    offload_optimizer: str | None = None

    def labels(self) -> dict[str, str]:
        shown = {}
        if self.weights:
            shown["weights"] = self.weights.label()
        if self.kv:
            shown["kv"] = self.kv.label()
        if self.prune:
            shown["prune"] = f"{self.prune.kind} {self.prune.fraction:.0%}"
        for key in ("tensor_parallel", "zero", "accumulate", "data"):
            if getattr(self, key) != Settings.model_fields[key].default:
                shown[key] = str(getattr(self, key))
        if self.checkpoint:
            shown["checkpoint"] = "activations"
        if self.offload_optimizer:
            shown["offload_optimizer"] = self.offload_optimizer
        return shown


_FORMAT = re.compile(r"^(fp32|fp16|bf16|fp8|int8|int4|nf4|int2)(?:\s+group\s+(\d+))?(?:\s+(symmetric|asymmetric))?$")
_PRUNE = re.compile(r"^(channels|heads|unstructured)\s+(\d+(?:\.\d+)?)%$|^(2:4)$")


def parse_format(text: str) -> QuantFormat:
    """`int4 group 128 asymmetric` -> QuantFormat (the plan language's format syntax)."""
    match = _FORMAT.match(" ".join(text.split()))
    if not match:
        raise fail("E410", f"not a format: '{text}'", hint="e.g. int8, int4 group 128, int4 group 32 asymmetric")
    dtype, group, symmetry = match.groups()
    return QuantFormat(dtype=dtype, group=int(group) if group else None, symmetric=symmetry != "asymmetric")


def parse_settings(items: list[str] | None) -> Settings:
    """`--with KEY=VALUE` items: weights=FORMAT, kv=FORMAT, prune=channels 25%|heads P%|unstructured P%|2:4,
    tensor=N, zero=0..3, checkpoint, accumulate=N, data=N, offload_optimizer=DEVICE."""
    values: dict = {}
    for item in items or []:
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        try:
            if key in ("weights", "kv"):
                values[key] = parse_format(value)
            elif key == "prune":
                match = _PRUNE.match(value)
                if not match:
                    raise ValueError(value)
                values[key] = (PruneChoice(kind="2:4", fraction=0.5) if match.group(3)
                               else PruneChoice(kind=match.group(1), fraction=float(match.group(2)) / 100))
            elif key in ("tensor", "zero", "accumulate", "data"):
                values["tensor_parallel" if key == "tensor" else key] = int(value)
            elif key == "checkpoint":
                values["checkpoint"] = True
            elif key == "offload_optimizer":
                values[key] = value
            else:
                raise KeyError(key)
        except (ValueError, KeyError):
            raise fail("E410", f"cannot use --with '{item}'",
                       hint="weights=FORMAT, kv=FORMAT, prune=channels 25%, tensor=N, zero=N, "
                            "checkpoint, accumulate=N, data=N, offload_optimizer=DEVICE") from None
    if not 0 <= values.get("zero", 0) <= 3:
        raise fail("E410", "zero stage must be 0, 1, 2 or 3")
    return Settings(**values)


class DeviceReport(DeviceMemory):
    """A device's predicted memory (every `DeviceMemory` figure) with its capacity and provenance."""

    kind: str
    capacity_bytes: int
    fits: bool = True
    price_per_h: float = 0.0
    source: str = ""


class EstimateReport(Record):
    """One estimate: the model's figures under one set of settings (the JSON contract)."""

    schema_version: str = SCHEMA_VERSION
    plan: str
    settings: dict[str, str] = Field(default_factory=dict)
    model: dict = Field(default_factory=dict)
    memory: dict = Field(default_factory=dict)
    latency: dict = Field(default_factory=dict)
    throughput_tok_s: float | None = None
    quality: dict = Field(default_factory=dict)
    cost_per_h: float | None = None
    training: dict | None = None
    notes: list[str] = Field(default_factory=list)
    baseline: "EstimateReport | None" = None


def _kept(inventory: Inventory, plan: ast.Plan) -> set[str]:
    selectors = [s.pattern for t in plan.allow.techniques if isinstance(t, ast.Keep) for s in t.selectors]
    return {m for m in inventory.module_names() for s in selectors if fnmatch.fnmatchcase(m, s)}


def _choices(inventory: Inventory, target: ResolvedTarget, plan: ast.Plan, settings: Settings) -> list[LayerChoice]:
    kept = _kept(inventory, plan)
    linear = {w.module: w for w in inventory.linear_layers()}
    choices = []
    for choice in default_choices(inventory, target):
        if choice.name in linear and choice.name not in kept:
            update = {}
            if settings.weights:
                update["format"] = settings.weights
            if settings.prune:
                update["prune"] = settings.prune
            choice = choice.model_copy(update=update)
        elif choice.name in kept:
            choice = choice.model_copy(update={"kept": True})
        choices.append(choice)
    return choices


def _model_section(inventory: Inventory) -> dict:
    arch = inventory.arch
    return {"source": inventory.source, "params": inventory.params(), "layers": arch.layers,
            "hidden": arch.hidden, "heads": arch.heads, "kv_heads": arch.kv_heads, "head_dim": arch.head_dim,
            "intermediate": arch.intermediate, "vocab": arch.vocab, "tied_embeddings": arch.tied_embeddings,
            "model_type": arch.model_type, "linear_layers": len(inventory.linear_layers()),
            "source_bytes": inventory.source_bytes}


def _memory_section(predicted: Predicted, target: ResolvedTarget) -> dict:
    by_device = {}
    for name, spec in target.devices.items():
        held = predicted.memory.by_device.get(name)
        figures = held.model_dump() if held else {}
        by_device[name] = DeviceReport(
            kind=spec.kind, capacity_bytes=spec.memory_bytes, **figures,
            fits=(held.total_bytes if held else 0) <= spec.memory_bytes,
            price_per_h=spec.price_per_h, source=spec.source).model_dump()
    computing = [m for n, m in predicted.memory.by_device.items() if target.device(n).computes]
    return {
        "weights_bytes": sum(m.weights_bytes for m in predicted.memory.by_device.values()),
        "kv_cache_bytes": sum(m.kv_cache_bytes for m in computing),
        "activations_bytes": sum(m.activations_bytes for m in computing),
        "runtime_bytes": sum(m.runtime_bytes for m in computing),
        "total_bytes": predicted.memory.total_bytes,
        "by_device": by_device,
    }


def estimate_once(plan: ast.Plan, inventory: Inventory, target: ResolvedTarget, settings: Settings) -> EstimateReport:
    """The figures of the plan's model under one set of settings."""
    if isinstance(plan.workload, ast.TrainingWorkload):
        offload = settings.offload_optimizer
        if offload is not None and offload not in target.devices:
            raise fail("E411", f"offload_optimizer names no device of the target: '{offload}'")
        if settings.data > 1:
            from lwdsl.hardware.probe_collective import ranks_local, with_local_collectives

            if ranks_local(target, settings.data):
                target = with_local_collectives(target, [settings.data], span=plan.target.span)
        result = training_breakdown(inventory, target, plan.workload, settings.zero, settings.data,
                                    settings.checkpoint, settings.accumulate, offload)
        predicted = result.predicted
        section = predicted.training.model_dump()
        section["activations_bytes"] = result.training_activations_bytes
        section["by_zero_stage"] = [
            {"stage": stage, "model_states_bytes": training_breakdown(
                inventory, target, plan.workload, stage, settings.data, settings.checkpoint,
                settings.accumulate, offload).predicted.training.model_states_bytes}
            for stage in range(4)]
        return EstimateReport(plan=plan.name, settings=settings.labels(), model=_model_section(inventory),
                              memory=_memory_section(predicted, target), cost_per_h=predicted.cost_per_h,
                              training=section)
    if settings.tensor_parallel > len(target.compute_devices()):
        raise fail("E411", f"tensor={settings.tensor_parallel} needs that many compute devices; the target has "
                           f"{len(target.compute_devices())}")
    result = breakdown(inventory, target, plan.workload, _choices(inventory, target, plan, settings),
                       settings.kv, settings.tensor_parallel)
    predicted = result.predicted
    latency = predicted.latency.model_dump()
    latency["by_component"] = {k: v.model_dump() for k, v in result.time_by_component.items()}
    return EstimateReport(
        plan=plan.name, settings=settings.labels(), model=_model_section(inventory),
        memory=_memory_section(predicted, target), latency=latency, throughput_tok_s=predicted.throughput_tok_s,
        quality=predicted.quality.model_dump(), cost_per_h=predicted.cost_per_h, notes=_grouped(result.notes))


def _grouped(notes: list[str]) -> list[str]:
    """`model.layers.N.x left as it was: why` for many N -> one line with the count."""
    counts: dict[str, int] = {}
    for note in notes:
        key = re.sub(r"\.\d+\.", ".*.", note, count=1)
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} ({n} layers)" if n > 1 else k for k, n in counts.items()]


def estimate(plan: ast.Plan, base_dir, settings: Settings | None = None, probe_cache=None) -> EstimateReport:
    """The plan's model as it is, and (when settings are given) with them, `baseline` holding the former."""
    inventory = load_inventory(plan.model, base_dir)
    target = resolve_target(plan.target, probe_cache=probe_cache)
    if not target.compute_devices():
        raise fail("E411", "the target has no device that computes (only disks)", plan.target.span)
    settings = settings or Settings()
    as_is = estimate_once(plan, inventory, target, Settings())
    if settings == Settings():
        return as_is
    return estimate_once(plan, inventory, target, settings).model_copy(update={"baseline": as_is})


EstimateReport.model_rebuild()
