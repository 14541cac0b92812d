"""Tensor parallelism over `torch.distributed` (Megatron-LM's split, Shoeybi et al. 2019, §3), and
pipeline placement by block, each block on the device the solver chose for it (`place_pipeline`).

Per block: q/k/v and gate/up are split by output rows (column-parallel: each rank computes its own
heads and channels, no communication), o and down by input columns (row-parallel: each rank's partial
product is summed with one `all_reduce`). Attention splits by whole kv groups, so every rank keeps
grouped-query attention intact; an uneven count (3 kv groups on 2 ranks) gives ranks unequal shares,
which the sum does not mind. Embedding, norms and head stay replicated. The same code runs on gloo
(CPU, tests) and NCCL (GPUs) under `torchrun`:

    rank, world = init_from_env()          # reads RANK / WORLD_SIZE set by torchrun
    shard_model(model, rank, world)

Quantized layers are sliced in their stored form (rows: codes and scales; columns: whole groups),
so a rank holds only its share of the packed bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lwdsl.apply.prune import sliced_linear
from lwdsl.apply.registry import ApplyContext, register
from lwdsl.errors import fail


@dataclass(frozen=True)
class ShardChoice:
    """This process's place in a tensor-parallel group."""

    rank: int
    world: int


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, NCCL when CUDA is there)."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            return 0, 1
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank(), world()


def split(count: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of share `index` when `count` items go to `parts` ranks as evenly as possible."""
    base, extra = divmod(count, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class RowParallel(nn.Module):
    """A linear holding some input columns; partial products summed across ranks, bias added once."""

    def __init__(self, local: nn.Module, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.local, self.group = local, group
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = local.in_features, local.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.local(x)
        if world() > 1:
            dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def _slice(module: nn.Module, start: int, end: int, dim: int) -> nn.Module:
    """Rows (`dim=0`) or columns (`dim=1`) [start, end) of a float or quantized linear."""
    index = torch.arange(start, end)
    if type(module) is nn.Linear:
        return sliced_linear(module, index, dim)
    from lwdsl.apply.quantize import CastLinear, QuantizedLinear

    if isinstance(module, CastLinear):
        weight = module.weight.detach().index_select(dim, index)
        bias = None if module.bias is None else (module.bias.index_select(0, index) if dim == 0 else module.bias)
        return CastLinear(weight, module.fmt, bias)
    if isinstance(module, QuantizedLinear):
        return _slice_quantized(module, start, end, dim)
    raise fail("E650", f"cannot shard a {type(module).__name__}",
               hint="tensor parallelism applies to float, cast and quantized linears")


def _slice_quantized(module, start: int, end: int, dim: int):
    from lwdsl.apply.kernels import Packed
    from lwdsl.apply.quantize import QuantizedLinear

    packed = module.packed()
    if dim == 0:
        rows = slice(start, end)
        piece = Packed(packed.codes[rows].contiguous(), packed.scale[rows].contiguous(),
                       None if packed.offset is None else packed.offset[rows].contiguous(),
                       packed.bits, packed.group, packed.levels, packed.in_features)
        bias = None if module.bias is None else module.bias[rows]
        return QuantizedLinear(piece, end - start, module.fmt, bias, module.kernel)
    per_byte = 8 // packed.bits
    size = packed.group or 1
    if start % size or end % size or start % per_byte or end % per_byte:
        raise fail("E651", f"columns {start}:{end} of a {module.fmt.label()} layer do not fall on "
                   f"group boundaries", hint="choose a group size that divides each rank's share")
    codes = packed.codes[:, start // per_byte:end // per_byte].contiguous()
    scale, offset = packed.scale, packed.offset  # per output channel: every column keeps its row's scale
    if packed.group is not None:
        groups = slice(start // size, end // size)
        scale = scale[:, groups].contiguous()
        offset = None if offset is None else offset[:, groups].contiguous()
    piece = Packed(codes, scale, offset, packed.bits, packed.group, packed.levels, end - start)
    return QuantizedLinear(piece, module.out_features, module.fmt, None, module.kernel)


def _row_parallel(module: nn.Module, start: int, end: int) -> RowParallel:
    bias = getattr(module, "bias", None)
    if type(module) is nn.Linear and bias is not None:
        local = sliced_linear(module, torch.arange(start, end), 1)
        local.bias = None
    else:
        local = _slice(module, start, end, 1)
    return RowParallel(local, bias)


def shard_attention(attn, rank: int, world: int):
    """This rank's kv groups (and their query heads) of one attention module."""
    head_dim = attn.head_dim
    heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    if kv_heads < world:
        raise fail("E652", f"{kv_heads} kv heads cannot be shared by {world} ranks",
                   hint="tensor parallelism splits attention by kv group")
    ratio = heads // kv_heads
    first, last = split(kv_heads, world, rank)
    attn.q_proj = _slice(attn.q_proj, first * ratio * head_dim, last * ratio * head_dim, 0)
    attn.k_proj = _slice(attn.k_proj, first * head_dim, last * head_dim, 0)
    attn.v_proj = _slice(attn.v_proj, first * head_dim, last * head_dim, 0)
    attn.o_proj = _row_parallel(attn.o_proj, first * ratio * head_dim, last * ratio * head_dim)
    return attn


def shard_mlp(mlp, rank: int, world: int, unit: int = 1):
    """This rank's intermediate channels (in multiples of `unit`, e.g. a quantization group)."""
    channels = mlp.gate_proj.out_features
    first, last = (x * unit for x in split(channels // unit, world, rank))
    mlp.gate_proj = _slice(mlp.gate_proj, first, last, 0)
    mlp.up_proj = _slice(mlp.up_proj, first, last, 0)
    mlp.down_proj = _row_parallel(mlp.down_proj, first, last)
    return mlp


@register(ShardChoice)
def shard_block(block: nn.Module, choice: ShardChoice, ctx: ApplyContext) -> nn.Module:
    """The handler: one decoder block reduced to this rank's share."""
    if choice.world <= 1:
        return block
    shard_attention(block.self_attn, choice.rank, choice.world)
    group = getattr(block.mlp.down_proj, "fmt", None)
    unit = group.group if group is not None and group.group else 1
    shard_mlp(block.mlp, choice.rank, choice.world, unit)
    return block


def shard_model(model: nn.Module, rank: int, world: int) -> nn.Module:
    """Every decoder block of a Llama-layout model reduced to this rank's share (in place)."""
    for index, block in enumerate(model.model.layers):
        shard_block(block, ShardChoice(rank, world), ApplyContext(name=f"model.layers.{index}"))
    return model


def place_pipeline(model: nn.Module, stages: list[str], io: str | None = None) -> dict[int, str]:
    """Each decoder block on the torch device the solver chose for it (`stages`: one entry a block, in
    block order, contiguous runs); the embedding, rotary table, final norm and head on `io`.

    `io` defaults to the first block's device. The solver prices the embedding and the head as one unit
    on one device (a tied head *is* the embedding, so splitting them would hold the table twice), and
    the final norm is a few hundred floats: it sits with the head, saving a hop. Returns block index ->
    device and records `model.lwdsl_placement`.

    Hooks move what crosses a device boundary. The Hugging Face forward computes the causal mask,
    position ids and rotary cos/sin once, on the embedding's device, and passes them to every block as
    keyword arguments, so a block off that device moves its kwargs too, not only the hidden state; the
    KV cache needs nothing (each layer's cache tensors are made from its own keys). The whole model's
    inputs go to `io` and its logits come back to the caller's device, so callers holding CPU token
    ids need not know. The lean decode loop calls modules directly and reads the placement record
    instead (`lwdsl.runtime.generate.LeanLlama`). With a single device nothing is hooked.
    """
    from lwdsl.placement import Placement, describe_runs

    inner, layers = model.model, model.model.layers
    if len(stages) != len(layers):
        raise fail("E648", f"the pipeline places {len(stages)} blocks but the model has {len(layers)}",
                   hint="the stages were solved for another model; solve and apply the plan again")
    io = io or stages[0]
    placement = Placement(tuple(stages), io, f"pipeline: {describe_runs(stages)}; embedding and head on {io}")
    for module in (inner.embed_tokens, getattr(inner, "rotary_emb", None), inner.norm, model.lm_head):
        if module is not None:
            module.to(io)
    previous = io
    for index, (layer, device) in enumerate(zip(layers, stages)):
        layer.to(device)
        # the hidden state comes from the previous block, the mask and rotary kwargs from the embedding's device
        if placement.pipelined and (device != io or device != previous):
            layer.register_forward_pre_hook(_inputs_to(torch.device(device)), with_kwargs=True)
        previous = device
    if placement.pipelined:
        if previous != io:
            inner.norm.register_forward_pre_hook(_inputs_to(torch.device(io)), with_kwargs=True)
        _io_hooks(model, torch.device(io))
    model.__dict__["lwdsl_placement"] = placement
    return dict(enumerate(stages))


def _move(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


def _inputs_to(device: torch.device):
    def hook(module, args, kwargs):
        return _move(args, device), {k: _move(v, device) for k, v in kwargs.items()}

    return hook


def _io_hooks(model: nn.Module, device: torch.device) -> None:
    """The model's tensor inputs to `device`; its logits back to where the caller's first tensor was."""
    caller: list[torch.device | None] = [None]

    def before(module, args, kwargs):
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        caller[0] = None if first is None else first.device
        return _move(args, device), {k: _move(v, device) for k, v in kwargs.items()}

    def after(module, args, kwargs, output):
        back = caller[0]
        if back is None or back == device:
            return output
        if isinstance(output, torch.Tensor):
            return output.to(back)
        if getattr(output, "logits", None) is not None:
            output.logits = output.logits.to(back)
        return output

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
