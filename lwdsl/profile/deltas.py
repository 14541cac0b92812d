"""The weight change `W' - W` one option makes to one layer, computed the way `apply` stores it.

Formats give exactly the values the executor stores (`lwdsl.apply.quantize.quantize_weight`, round
to nearest with the plan's scheme, then dequantised); the integer formats are computed here without
the byte packing, which is most of the executor's quantizing time and changes no value.

Pruning is expressed as a change of the layer that *consumes* what is removed, so the loss of a
structural prune is counted once: removing MLP channel c (gate and up rows c, down column c) changes
the block's output by `-W_down[:, c] * h_c`, i.e. down's weight with column c zeroed; gate and up
keep only their format's change on the rows that remain. Heads likewise land on `o_proj`'s
columns. Unstructured and 2:4 masks zero the smallest-magnitude weights of the layer itself.
Which channels and heads go is the executor's own selection (`lwdsl.apply.prune`): scored on the
calibration text, as `lwdsl apply` does by default (`prune_scores`), or by magnitude without it.
"""
from __future__ import annotations

import torch

from lwdsl.profile.sensitivity import Derived
from lwdsl.solution import PruneChoice, QuantFormat

_CHANNEL_ROLES = {"gate_proj": "out", "up_proj": "out", "down_proj": "in"}
_HEAD_ROLES = {"q_proj": "out", "k_proj": "out", "v_proj": "out", "o_proj": "in"}


_LINEAR_BITS = {"int8": 8, "int4": 4, "int2": 2}


def _linear_round_trip(weight: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> torch.Tensor:
    """The values `kernels.quantize_linear_codes` then `kernels.dequantize` give, without packing the
    codes into bytes and back (same minimum scale and rounding to fp16, same code range; tests pin
    equality). The minimum matters: below fp16's smallest subnormal a scale rounds to zero, and a
    group of zeros (Qwen2.5-Coder has them) divides 0 by 0."""
    from lwdsl.apply.kernels import MIN_SCALE

    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // (group or cols), group or cols)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        low = -top if bits == 8 else -(top + 1)
        scale = (blocks.abs().amax(-1) / top).clamp(min=MIN_SCALE).to(torch.float16).float()[..., None]
        return (torch.round(blocks / scale).clamp(low, top) * scale).reshape(rows, cols)
    top = 2 ** bits - 1
    minimum, maximum = blocks.amin(-1), blocks.amax(-1)
    scale = ((maximum - minimum) / top).clamp(min=MIN_SCALE).to(torch.float16).float()[..., None]
    offset = minimum.to(torch.float16).float()[..., None]
    codes = torch.round((blocks - offset) / scale).clamp(0, top)
    return (codes * scale + offset).reshape(rows, cols)


def quantized_weight(weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """`weight` as `fmt` stores it (round to nearest, the executor's scheme), back in float32."""
    if fmt.dtype == "fp32":
        return weight
    if fmt.dtype in ("fp16", "bf16"):
        return weight.to(torch.float16 if fmt.dtype == "fp16" else torch.bfloat16).float()
    if fmt.dtype in _LINEAR_BITS:
        return _linear_round_trip(weight.float(), _LINEAR_BITS[fmt.dtype], fmt.group, fmt.symmetric)
    from lwdsl.apply.quantize import dequantize_packed, quantize_weight

    return dequantize_packed(quantize_weight(weight, fmt))


def _block_prefix(name: str) -> str:
    return name.rsplit(".", 1)[0]


def prune_scores(model, options: dict, calibration_ids, parts: tuple[slice, ...] = ()):
    """Per MLP / attention prefix, the executor's activation-aware prune scores on the calibration
    text (`lwdsl.apply.prune.channel_scores` / `head_scores` over the inputs `capture_inputs` sees),
    for every block some channel or head option is profiled in. `lwdsl apply` scores the same way.

    With `parts` (slices of the windows), also the scores each part alone would give, from the same
    forward pass: returns `[scores, part scores, ...]`."""
    from lwdsl.apply import capture_inputs
    from lwdsl.apply.prune import channel_scores, head_scores

    wanted: dict[str, tuple[str, str]] = {}  # captured module -> (prefix, kind)
    for name, layer_options in options.items():
        kinds = {prune.kind for _fmt, prune in layer_options}
        prefix = _block_prefix(name)
        if "channels" in kinds:
            wanted[f"{prefix}.gate_proj"] = (prefix, "channels")
        if "heads" in kinds:
            wanted[f"{prefix}.o_proj"] = (prefix, "heads")
    if not wanted:
        return [{} for _ in range(len(parts) + 1)] if parts else {}
    captured = capture_inputs(model, list(wanted), calibration_ids)
    length = calibration_ids.shape[-1]
    results = []
    for rows in (slice(None),) + tuple(slice((p.start or 0) * length, None if p.stop is None else p.stop * length)
                                        for p in parts):
        scores = {}
        for module, (prefix, kind) in wanted.items():
            part = model.get_submodule(prefix)
            inputs = captured[module][rows]  # window-major rows: a slice of windows is a slice of rows
            scores[prefix] = channel_scores(part, inputs) if kind == "channels" else head_scores(part, inputs)
        results.append(scores)
    return results if parts else results[0]


def _removed(scores: torch.Tensor, keep_count: int) -> torch.Tensor:
    removed = torch.ones(scores.numel(), dtype=torch.bool)
    removed[torch.topk(scores, keep_count).indices] = False
    return removed.nonzero().squeeze(-1)


def removed_channels(model, name: str, fraction: float, scores: dict | None = None) -> torch.Tensor:
    """Indices of the MLP intermediate channels a channel prune of `fraction` removes in this block:
    the executor's scores (activation-aware when `scores` has them, else magnitude) and count."""
    from lwdsl.apply.prune import channel_scores
    from lwdsl.cost.formats import kept

    prefix = _block_prefix(name)
    block_scores = (scores or {}).get(prefix)
    if block_scores is None:
        block_scores = channel_scores(model.get_submodule(prefix))
    return _removed(block_scores, kept(block_scores.numel(), fraction))


def removed_heads(model, name: str, fraction: float, scores: dict | None = None) -> torch.Tensor:
    """Column indices of `o_proj` belonging to the query heads a head prune of `fraction` removes."""
    from lwdsl.apply.prune import head_counts, head_scores
    from lwdsl.cost.formats import kept

    prefix = _block_prefix(name)
    attention = model.get_submodule(prefix)
    heads, _kv_heads, head_dim = head_counts(attention)
    block_scores = (scores or {}).get(prefix)
    if block_scores is None:
        block_scores = head_scores(attention)
    chosen = _removed(block_scores, kept(heads, fraction))
    return (chosen[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _mask_smallest(weight: torch.Tensor, prune: PruneChoice) -> torch.Tensor:
    if prune.kind == "2:4":
        groups = weight.reshape(weight.shape[0], -1, 4)
        order = groups.abs().argsort(dim=-1)[..., :2]
        return groups.scatter(-1, order, 0.0).reshape(weight.shape)
    count = int(weight.numel() * prune.fraction)
    if count == 0:
        return weight
    threshold = weight.abs().flatten().kthvalue(count).values
    return torch.where(weight.abs() <= threshold, torch.zeros_like(weight), weight)


def _columns_removed(weight: torch.Tensor, removed: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """`W' - W` when the executor slices input columns out and then stores what is left in `fmt`:
    the quantization groups run along the kept columns, so the rounding is not the full matrix's
    (int4 g32 asymmetric is the GGUF's own grid, lossless on the full matrix, lossy once columns go)."""
    keep = torch.ones(weight.shape[1], dtype=torch.bool)
    keep[removed] = False
    stored = torch.zeros_like(weight)
    stored[:, keep] = quantized_weight(weight[:, keep].contiguous(), fmt)
    return stored - weight


def option_delta(model, name: str, option: tuple[QuantFormat, PruneChoice], scores: dict | None = None):
    """`W' - W` for `option` on the linear `name` of `model`, or a `Derived` change built from the
    same layer's format-only option (listed before it by `layer_options`). The model is unchanged."""
    fmt, prune = option
    weight = model.get_submodule(name).weight.detach().float()
    leaf = name.rsplit(".", 1)[-1]
    base = (fmt, PruneChoice()) if fmt.dtype != "fp32" else None
    if prune.kind == "channels" and leaf in _CHANNEL_ROLES:
        removed = removed_channels(model, name, prune.fraction, scores)
        if _CHANNEL_ROLES[leaf] == "in":  # the removed channels no longer reach the block's output
            return _columns_removed(weight, removed, fmt) if base else Derived(drop_columns=removed)
        return Derived(base=base, zero_rows=removed)  # gate/up rows: the loss is counted on down_proj
    if prune.kind == "heads" and leaf in _HEAD_ROLES:
        if _HEAD_ROLES[leaf] == "in":
            removed = removed_heads(model, name, prune.fraction, scores)
            return _columns_removed(weight, removed, fmt) if base else Derived(drop_columns=removed)
        # q/k/v rows of a removed head: counted once, on o_proj (with grouped-query attention the
        # k/v rows are shared, so their format change stays as measured).
        return Derived(base=base)
    if prune.kind in ("unstructured", "2:4"):
        return quantized_weight(_mask_smallest(weight, prune), fmt) - weight
    return quantized_weight(weight, fmt) - weight


def dense_delta(model, name: str, option: tuple[QuantFormat, PruneChoice], scores: dict | None = None) -> torch.Tensor:
    """`W' - W` as a full matrix, whatever form `option_delta` gives it in (for exact measurement)."""
    spec = option_delta(model, name, option, scores)
    if isinstance(spec, torch.Tensor):
        return spec
    weight = model.get_submodule(name).weight.detach().float()
    delta = option_delta(model, name, spec.base) if spec.base is not None else torch.zeros_like(weight)
    delta = delta.clone()
    if spec.zero_rows is not None:
        delta[spec.zero_rows] = 0.0
    if spec.drop_columns is not None:
        delta[:, spec.drop_columns] = -weight[:, spec.drop_columns]
    return delta
