"""The executor's driver: a `Solution` applied to a torch model, layer by layer, by registered handlers.

Order per model: calibration inputs are captured once (when prunes want them), then structured prunes
(MLP channels per block, attention heads per block), masks (unstructured, 2:4), weight formats, and
placement (offload marks). Every layer the solution names is transformed as named or the apply fails
with an E6xx error; `model.lwdsl_layers` records what each layer became (`LayerRecord`), and that
record is what the artifact's manifest stores and `lwdsl.load` rebuilds from.

    model = apply_solution(model, solution, DriverContext(device_kinds={"ssd": "disk"}))

The package itself is callable as the facade `lwdsl.apply(plan, output, solution=None)`
(`lwdsl.apply.pipeline.apply_plan`).
"""
from __future__ import annotations

import sys
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lwdsl.apply.records import LayerRecord, describe
from lwdsl.apply.registry import ApplyContext, apply_choice
from lwdsl.cost.formats import pruned_shape
from lwdsl.errors import fail
from lwdsl.solution import LayerChoice, PruneChoice, QuantFormat, Solution

# Roles by the module's last name (the HF Llama layout; the inventory names the same roles).
ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_o",
         "gate_proj": "mlp_gate", "up_proj": "mlp_up", "down_proj": "mlp_down", "lm_head": "head",
         "embed_tokens": "embedding"}


@dataclass(frozen=True)
class DriverContext:
    """What the driver needs besides the model and the solution.

    `device_kinds`: device name -> "cpu" | "gpu" | "disk" (a layer whose `device` differs from its
    `compute_device` is offloaded: to disk when that device is a disk, else kept in host memory).
    `calibration_ids`: token ids `[1, n]` for activation-aware prune scores (None: magnitude).
    `progress`: called with each layer name as it is done.
    """

    device_kinds: dict[str, str] = field(default_factory=dict)
    calibration_ids: Any = None
    progress: Callable[[str], None] | None = None


def role_of(name: str) -> str:
    return ROLES.get(name.rsplit(".", 1)[-1], "other")


def _parent(model, name: str):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _module(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise fail("E620", f"the solution names {name!r}, which the model does not have",
                   hint="was the solution solved for another model?") from None


def _replace(model, name: str, module) -> None:
    parent, child = _parent(model, name)
    setattr(parent, child, module)


def capture_inputs(model, names: list[str], input_ids) -> dict[str, Any]:
    """The input rows `[tokens, features]` each named module sees on one forward of `input_ids`."""
    import torch

    captured, hooks = {}, []
    for name in names:
        def hook(module, args, name=name):
            captured[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in hooks:
            handle.remove()
    return captured


def _block_prunes(choices: dict[str, LayerChoice]) -> tuple[dict, dict]:
    """Per block prefix: the channel prune of its MLP and the (q, kv) head prunes of its attention."""
    channels, heads = {}, defaultdict(dict)
    for name, choice in choices.items():
        role, prefix = role_of(name), name.rsplit(".", 1)[0]
        if choice.prune.kind == "channels":
            if role not in ("mlp_gate", "mlp_up", "mlp_down"):
                raise fail("E614", f"{name}: channel pruning applies to MLP gate/up/down, not {role}")
            previous = channels.setdefault(prefix, choice.prune)
            if previous != choice.prune:
                raise fail("E614", f"{prefix}: gate/up/down must share one channel prune "
                           f"({previous.fraction} vs {choice.prune.fraction})")
        elif choice.prune.kind == "heads":
            if role not in ("attn_q", "attn_k", "attn_v", "attn_o"):
                raise fail("E614", f"{name}: head pruning applies to attention q/k/v/o, not {role}")
            side = "q" if role in ("attn_q", "attn_o") else "kv"
            previous = heads[prefix].setdefault(side, choice.prune)
            if previous != choice.prune:
                raise fail("E614", f"{prefix}: {'q/o' if side == 'q' else 'k/v'} must share one head prune")
    for prefix in channels:
        missing = [p for p in ("gate_proj", "up_proj", "down_proj") if choices.get(f"{prefix}.{p}",
                   None) is None or choices[f"{prefix}.{p}"].prune.kind != "channels"]
        if missing:
            raise fail("E614", f"{prefix}: a channel prune needs gate, up and down together "
                       f"(missing: {', '.join(missing)})")
    return channels, dict(heads)


def apply_solution(model, solution: Solution, ctx: DriverContext | None = None):
    """Transform `model` in place as `solution` says and return it (E6xx when a layer cannot be).

    The caller owns the model: pass a copy to keep the original. `model.lwdsl_layers` afterwards maps
    each named layer to its `LayerRecord`.
    """
    from lwdsl.apply import offload, prune, quantize  # noqa: F401  (registers the handlers)

    ctx = ctx or DriverContext()
    choices = {c.name: c for c in solution.layers}
    for name in choices:
        _module(model, name)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    original = {name: tuple(_module(model, name).weight.shape) for name in choices}
    channels, heads = _block_prunes(choices)
    calibration = _calibration(model, choices, channels, heads, ctx)

    for prefix, choice in channels.items():
        apply_choice(_module(model, prefix), choice, ApplyContext(name=prefix, calibration=calibration.get(prefix)))
    for prefix, sides in heads.items():
        q_choice, kv_choice = sides.get("q", PruneChoice()), sides.get("kv", PruneChoice())
        attn = _module(model, prefix)
        keep_heads = pruned_shape(tuple(attn.q_proj.weight.shape), "attn_q", q_choice, head_dim)[0] // head_dim
        keep_kv = pruned_shape(tuple(attn.k_proj.weight.shape), "attn_k", kv_choice, head_dim)[0] // head_dim
        options = {"keep_heads": keep_heads, "keep_kv_heads": keep_kv}
        apply_choice(attn, q_choice if q_choice.kind == "heads" else kv_choice,
                     ApplyContext(name=prefix, calibration=calibration.get(prefix), options=options))

    records = {}
    for name, choice in choices.items():
        if choice.kept:
            records[name] = describe(name, _module(model, name), choice, original[name], "resident")
            _progress(ctx, name)
            continue
        module = _module(model, name)
        if choice.prune.kind in ("unstructured", "2:4"):
            module = apply_choice(module, choice.prune, ApplyContext(name=name, calibration=calibration.get(name)))
        module = _apply_format(module, choice.format, name)
        storage = "resident"
        if choice.device != choice.compute_device:
            storage = "disk" if ctx.device_kinds.get(choice.device) == "disk" else "host"
            module = apply_choice(module, offload.OffloadChoice(storage=storage, device=choice.device),
                                  ApplyContext(name=name))
        _replace(model, name, module)
        records[name] = describe(name, module, choice, original[name], storage)
        _verify(records[name], choice, original[name], head_dim)
        _progress(ctx, name)
    model.lwdsl_layers = records
    return model


def _apply_format(module, fmt: QuantFormat, name: str):
    from lwdsl.apply.prune import Sparse24Linear

    if fmt.dtype == "fp32":
        return module
    if isinstance(module, Sparse24Linear):  # the kept values take the format
        module.values = apply_choice(module.values, fmt, ApplyContext(name=name + ".values"))
        return module
    return apply_choice(module, fmt, ApplyContext(name=name))


def _calibration(model, choices, channels, heads, ctx: DriverContext) -> dict[str, Any]:
    """Inputs for activation-aware scores, keyed by what each prune handler is given."""
    if ctx.calibration_ids is None:
        return {}
    wanted = {f"{p}.gate_proj": p for p in channels}
    wanted.update({f"{p}.o_proj": p for p in heads})
    wanted.update({n: n for n, c in choices.items() if c.prune.kind in ("unstructured", "2:4")})
    if not wanted:
        return {}
    captured = capture_inputs(model, list(wanted), ctx.calibration_ids)
    return {key: captured[name] for name, key in wanted.items()}


def _verify(record: LayerRecord, choice: LayerChoice, shape: tuple[int, ...], head_dim: int) -> None:
    """The layer became what the solution named, or E621."""
    expected = pruned_shape(shape, role_of(choice.name), choice.prune, head_dim)
    problems = []
    if tuple(record.shape) != tuple(expected):
        problems.append(f"shape {list(record.shape)} instead of {list(expected)}")
    if record.format != choice.format:
        problems.append(f"format {record.format.label()} instead of {choice.format.label()}")
    if choice.prune.kind in ("unstructured", "2:4") and record.prune.kind != choice.prune.kind:
        problems.append(f"prune {record.prune.kind} instead of {choice.prune.kind}")
    if problems:
        raise fail("E621", f"{choice.name} was not transformed as the solution says: {'; '.join(problems)}")


def _progress(ctx: DriverContext, name: str) -> None:
    if ctx.progress is not None:
        ctx.progress(name)


class _CallableModule(types.ModuleType):
    """`lwdsl.apply(plan, output, solution=None)` is the facade; `lwdsl.apply.*` the package."""

    def __call__(self, plan, output, solution: Solution | None = None, **options):
        from lwdsl.apply.pipeline import apply_plan

        return apply_plan(plan, output, solution, **options)


sys.modules[__name__].__class__ = _CallableModule
