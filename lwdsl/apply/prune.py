"""Pruning handlers: structured prunes that really shrink matrices, and masks stored honestly.

- `channels`: removes MLP intermediate channels (rows of gate/up, columns of down); the module given
  is the block's MLP.
- `heads`: removes attention heads (rows of q, columns of o; rows of k/v for whole kv groups),
  respecting grouped-query attention: whole kv groups go together with their query heads, or only
  query heads go, the same number from each group. The module given is the block's attention.
- `unstructured`: the lowest-scored fraction of each output row set to zero; stored dense, so no byte
  is saved (`lwdsl.cost.formats` counts it that way too).
- `2:4`: two of every four consecutive input weights kept, stored as `Sparse24Linear`: the kept
  values `[out, in/2]` (a module of their own, which a format can then quantize) plus 2 bits of
  position a kept value: the layout the cost model counts.

Scores: magnitude by default; with calibration inputs (`ctx.calibration`), activation-aware in the
manner of Wanda (Sun et al. 2023): a weight's score is |w| times the norm of the input it multiplies.
For channels the calibration is the MLP's input; for heads it is the input of `o_proj` (the per-head
attention outputs); for masks, the linear's own input.

    mlp = prune_module(block.mlp, PruneChoice(kind="channels", fraction=0.25), ApplyContext())
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lwdsl.apply.registry import ApplyContext, register
from lwdsl.cost.formats import kept
from lwdsl.errors import fail
from lwdsl.solution import PruneChoice


def _require_linear(module, name: str, what: str) -> nn.Linear:
    if type(module) is not nn.Linear:
        raise fail("E611", f"{name}: cannot {what} a {type(module).__name__}",
                   hint="prune before quantizing: pruning needs the float nn.Linear")
    return module


def sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new `nn.Linear` keeping the rows (`dim=0`) or columns (`dim=1`) in `index`."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_features, in_features = weight.shape
    result = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                       dtype=weight.dtype, device=weight.device)
    result.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        bias = linear.bias.detach()
        result.bias = nn.Parameter(bias.index_select(0, index).clone() if dim == 0 else bias.clone(),
                                   requires_grad=False)
    return result


def _input_norm(calibration, features: int) -> torch.Tensor | None:
    if calibration is None:
        return None
    rows = calibration.reshape(-1, features).float()
    return rows.norm(dim=0)


# --- channels ---------------------------------------------------------------------------------------

def channel_scores(mlp, calibration: torch.Tensor | None = None) -> torch.Tensor:
    """One score per intermediate channel: the norm of its contribution to the MLP's output.

    Magnitude: |gate row| · |up row| · |down column|. With calibration inputs: the channel's
    activation norm over the samples times |down column| (Wanda's |w|·‖x‖ for the down projection).
    """
    down = mlp.down_proj.weight.detach().float().norm(dim=0)
    if calibration is None:
        gate = mlp.gate_proj.weight.detach().float().norm(dim=1)
        up = mlp.up_proj.weight.detach().float().norm(dim=1)
        return gate * up * down
    inputs = calibration.reshape(-1, mlp.gate_proj.in_features).float()
    with torch.no_grad():
        hidden = F.silu(mlp.gate_proj(inputs)) * mlp.up_proj(inputs)
    return hidden.float().norm(dim=0) * down


def prune_channels(mlp, keep_count: int, scores: torch.Tensor) -> nn.Module:
    """Keep the `keep_count` best intermediate channels of a gated MLP; the matrices shrink."""
    index = torch.sort(torch.topk(scores, keep_count).indices).values
    mlp.gate_proj = sliced_linear(mlp.gate_proj, index, 0)
    mlp.up_proj = sliced_linear(mlp.up_proj, index, 0)
    mlp.down_proj = sliced_linear(mlp.down_proj, index, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep_count
    return mlp


def _channels(module, choice: PruneChoice, ctx: ApplyContext):
    for part in ("gate_proj", "up_proj", "down_proj"):
        _require_linear(getattr(module, part, None), f"{ctx.name}.{part}", "prune channels of")
    total = module.gate_proj.out_features
    keep_count = ctx.options.get("keep_channels") or kept(total, choice.fraction)
    return prune_channels(module, keep_count, channel_scores(module, ctx.calibration))


# --- heads ------------------------------------------------------------------------------------------

def head_counts(attn) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of an attention module, read from its live projections."""
    head_dim = attn.head_dim
    return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim


def head_scores(attn, calibration: torch.Tensor | None = None) -> torch.Tensor:
    """One score per query head: |q rows| · |o columns| (magnitude), or the head's output norm over
    the calibration samples times |o columns| (activation-aware)."""
    heads, _, head_dim = head_counts(attn)
    o_cols = attn.o_proj.weight.detach().float().reshape(-1, heads, head_dim).norm(dim=(0, 2))
    if calibration is None:
        q_rows = attn.q_proj.weight.detach().float().reshape(heads, -1).norm(dim=1)
        return q_rows * o_cols
    per_head = calibration.reshape(-1, heads, head_dim).float().norm(dim=(0, 2))
    return per_head * o_cols


def check_gqa(name: str, heads: int, kv_heads: int, keep_heads: int, keep_kv: int) -> int:
    """Query heads kept per kv group, or E612 when the counts cannot form grouped attention."""
    ratio = heads // kv_heads
    if not (1 <= keep_kv <= kv_heads and 1 <= keep_heads <= heads) or keep_heads % keep_kv \
            or keep_heads // keep_kv > ratio:
        raise fail("E612", f"{name}: keeping {keep_heads} of {heads} query heads and {keep_kv} of "
                   f"{kv_heads} kv heads does not form grouped-query attention",
                   hint=f"keep whole kv groups ({ratio} query heads each) or the same number of "
                        f"query heads in every group")
    return keep_heads // keep_kv


def prune_heads(attn, keep_heads: int, keep_kv: int, scores: torch.Tensor, name: str = "attention"):
    """Keep the best `keep_kv` kv groups and, in each, its best `keep_heads / keep_kv` query heads."""
    heads, kv_heads, head_dim = head_counts(attn)
    per_group = check_gqa(name, heads, kv_heads, keep_heads, keep_kv)
    ratio = heads // kv_heads
    grouped = scores.reshape(kv_heads, ratio)
    groups = torch.sort(torch.topk(grouped.sum(1), keep_kv).indices).values
    query_heads = []
    for group in groups.tolist():
        best = torch.sort(torch.topk(grouped[group], per_group).indices).values
        query_heads += [group * ratio + h for h in best.tolist()]

    def rows(head_ids):
        return torch.tensor([h * head_dim + d for h in head_ids for d in range(head_dim)])

    q_index, kv_index = rows(query_heads), rows(groups.tolist())
    attn.q_proj = sliced_linear(attn.q_proj, q_index, 0)
    attn.k_proj = sliced_linear(attn.k_proj, kv_index, 0)
    attn.v_proj = sliced_linear(attn.v_proj, kv_index, 0)
    attn.o_proj = sliced_linear(attn.o_proj, q_index, 1)
    attn.num_key_value_groups = per_group  # what HF's eager / sdpa attention read at run time
    attn.num_heads, attn.num_key_value_heads = keep_heads, keep_kv
    return attn


def _heads(module, choice: PruneChoice, ctx: ApplyContext):
    for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _require_linear(getattr(module, part, None), f"{ctx.name}.{part}", "prune heads of")
    heads, kv_heads, _ = head_counts(module)
    keep_heads = ctx.options.get("keep_heads") or kept(heads, choice.fraction)
    keep_kv = ctx.options.get("keep_kv_heads") or kept(kv_heads, choice.fraction)
    return prune_heads(module, keep_heads, keep_kv, head_scores(module, ctx.calibration), ctx.name)


# --- masks ------------------------------------------------------------------------------------------

def weight_scores(linear: nn.Linear, calibration: torch.Tensor | None = None) -> torch.Tensor:
    """|w|, or Wanda's |w| · ‖x_j‖ with calibration inputs."""
    scores = linear.weight.detach().float().abs()
    norm = _input_norm(calibration, linear.in_features)
    return scores if norm is None else scores * norm[None, :]


def mask_unstructured(linear: nn.Linear, fraction: float, scores: torch.Tensor) -> nn.Linear:
    """Zero the lowest-scored `fraction` of each output row (Wanda compares within a row)."""
    remove = int(linear.in_features * fraction)
    if remove > 0:
        lowest = torch.topk(scores, remove, dim=1, largest=False).indices
        with torch.no_grad():
            linear.weight.scatter_(1, lowest, 0.0)
    linear.sparsity = fraction  # recorded: stored dense, saves no bytes
    return linear


class Sparse24Linear(nn.Module):
    """A 2:4 sparse linear: kept values `[out, in/2]` in `values` (an nn.Linear, or a quantized module
    once a format applies) and each kept value's position in its group of four, 2 bits, in `meta`
    (`[out, in/8]` bytes). Computed by rebuilding the dense matrix (no sparse kernel on this CPU)."""

    def __init__(self, values: nn.Module, meta: torch.Tensor, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.values = values
        self.register_buffer("meta", meta)
        self.in_features, self.out_features = in_features, meta.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scores: torch.Tensor) -> "Sparse24Linear":
        out_features, in_features = linear.weight.shape
        if in_features % 8:
            raise fail("E613", f"2:4 needs the input dimension to be a multiple of 8, not {in_features}")
        blocks = scores.reshape(out_features, -1, 4)
        keep = torch.sort(torch.topk(blocks, 2, dim=-1).indices, dim=-1).values  # [out, in/4, 2]
        weight = linear.weight.detach().float().reshape(out_features, -1, 4)
        values = torch.gather(weight, 2, keep).reshape(out_features, in_features // 2)
        inner = nn.Linear(in_features // 2, out_features, bias=False)
        inner.weight = nn.Parameter(values.to(linear.weight.dtype), requires_grad=False)
        return cls(inner, _pack_positions(keep.reshape(out_features, -1)), in_features, linear.bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, values: nn.Module, bias: bool = False):
        meta = torch.zeros(out_features, in_features // 8, dtype=torch.uint8)
        return cls(values, meta, in_features, torch.zeros(out_features) if bias else None)

    def kept_values(self) -> torch.Tensor:
        inner = self.values
        return inner.dequantized_weight() if hasattr(inner, "dequantized_weight") else inner.weight

    def dense_weight(self) -> torch.Tensor:
        positions = _unpack_positions(self.meta).reshape(self.out_features, -1, 2).long()
        values = self.kept_values().float().reshape(self.out_features, -1, 2)
        dense = torch.zeros(self.out_features, self.in_features // 4, 4, dtype=values.dtype)
        dense.scatter_(2, positions, values)
        return dense.reshape(self.out_features, self.in_features)

    def weight_bytes(self) -> int:
        inner = self.values
        values = inner.weight_bytes() if hasattr(inner, "weight_bytes") else \
            inner.weight.numel() * inner.weight.element_size()
        return values + self.meta.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, 2:4"


def _pack_positions(positions: torch.Tensor) -> torch.Tensor:
    """Positions 0..3 `[out, n]` into bytes `[out, n/4]`, four 2-bit fields a byte, low bits first."""
    grouped = positions.to(torch.uint8).reshape(positions.shape[0], -1, 4)
    packed = torch.zeros(grouped.shape[:2], dtype=torch.uint8)
    for slot in range(4):
        packed |= grouped[..., slot] << (2 * slot)
    return packed


def _unpack_positions(packed: torch.Tensor) -> torch.Tensor:
    fields = [(packed >> (2 * slot)) & 3 for slot in range(4)]
    return torch.stack(fields, dim=-1).reshape(packed.shape[0], -1)


def _unstructured(module, choice: PruneChoice, ctx: ApplyContext):
    linear = _require_linear(module, ctx.name, "mask")
    return mask_unstructured(linear, choice.fraction, weight_scores(linear, ctx.calibration))


def _sparse24(module, choice: PruneChoice, ctx: ApplyContext):
    linear = _require_linear(module, ctx.name, "2:4-prune")
    return Sparse24Linear.from_linear(linear, weight_scores(linear, ctx.calibration))


PRUNERS = {"none": lambda module, choice, ctx: module, "channels": _channels, "heads": _heads,
           "unstructured": _unstructured, "2:4": _sparse24}
# What each kind acts on: the block's MLP, its attention, or the linear itself.
TARGET = {"channels": "mlp", "heads": "attention", "unstructured": "linear", "2:4": "linear", "none": "linear"}


@register(PruneChoice)
def prune_module(module: nn.Module, choice: PruneChoice, ctx: ApplyContext) -> nn.Module:
    """The handler: the pruned module (shrunk MLP / attention, masked linear or `Sparse24Linear`)."""
    if not 0.0 <= choice.fraction < 1.0:
        raise fail("E610", f"{ctx.name}: prune fraction {choice.fraction} is outside [0, 1)")
    return PRUNERS[choice.kind](module, choice, ctx)


def prune_mlp_channels(model, fraction: float, calibration_ids=None, calibration: dict | None = None) -> dict[str, int]:
    """Every block's MLP channel-pruned by `fraction` (the decode benchmark's pruned variants).

    Scores: Wanda-style on `calibration_ids` (token ids `[batch, n]`, one forward captures every MLP's
    input), or on `calibration` (block index -> MLP input rows), else magnitude. Returns the channels
    kept per MLP.
    """
    if calibration_ids is not None:
        from lwdsl.apply import capture_inputs

        names = [f"model.layers.{i}.mlp.gate_proj" for i in range(len(model.model.layers))]
        captured = capture_inputs(model, names, calibration_ids)
        calibration = {i: captured[name] for i, name in enumerate(names)}
    result = {}
    for index, layer in enumerate(model.model.layers):
        sample = (calibration or {}).get(index)
        prune_module(layer.mlp, PruneChoice(kind="channels", fraction=fraction),
                     ApplyContext(name=f"model.layers.{index}.mlp", calibration=sample))
        result[f"model.layers.{index}.mlp"] = layer.mlp.gate_proj.out_features
    return result
