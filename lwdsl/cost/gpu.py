"""What lwdsl's GPU executor costs on a `gpu` device. Pure; no torch.

The executor (apply/run on `cuda`) runs the checkpoint's half precision (bf16) throughout:
- attention through `scaled_dot_product_attention` (flash / memory-efficient kernels): no score
  matrix in memory; a prompt prefills in chunks whose transient activations (O(chunk · hidden) of one
  block, and the cached keys/values expanded to the query heads) fit `prefill_workspace_bytes`;
- a static KV cache preallocated for batch × (context + generate) positions, rounded up to
  `cache_multiple`, in the KV format; a decode step reads all of it (the captured graph's shapes are
  fixed; a mask hides the positions not yet written: `decode_attention_reads`);
- each decode step captured as a CUDA graph: one graph launch a step, and each kernel of the step
  costs its memory/compute time plus a small in-graph gap (`kernel_gap_s`);
- weights on their CUDA kernels (`KERNEL_FAMILY`): cuBLAS bf16/fp16, int8 and int4 weight-only
  (`torch._weight_int8pack_mm`, tinygemm `torch._weight_int4pack_mm`), fp8 `torch._scaled_mm` on
  cards with fp8 units; each at the fraction of the card's bandwidth (decode) and peak (prefill)
  published measurements show it reaching (`lwdsl/data/gpu_kernels.json`, with sources);
- tensor parallel over NCCL: weights, KV cache and activations divided by the degree, two
  all-reduces a block priced by `allreduce_s`.
"""
from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources

from pydantic import BaseModel, ConfigDict

from lwdsl.hardware.records import DeviceSpec, LinkSpec
from lwdsl.inventory.records import ArchNumbers
from lwdsl.solution import QuantFormat

ACTIVATION = "bf16"  # the executor's activation and KV dtype on a GPU (the checkpoints' own)
ACTIVATION_BYTES = 2

# Storage dtype -> the kernel family that multiplies it (fp8 without fp8 units: see `kernel_family`).
KERNEL_FAMILY = {"fp32": "half", "bf16": "half", "fp16": "half", "int8": "int8_weight_only",
                 "int4": "int4_tinygemm", "fp8": "fp8_scaled_mm", "nf4": "dequantize", "int2": "dequantize"}


class KernelFigures(BaseModel):
    """One kernel family: the dtype its product runs at and the fractions of peak it reaches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: str
    bandwidth: float
    compute: float
    source: str = ""


@cache
def figures() -> dict:
    """The GPU executor's figures (`lwdsl/data/gpu_kernels.json`)."""
    text = resources.files("lwdsl").joinpath("data").joinpath("gpu_kernels.json").read_text()
    return json.loads(text)


def graphed(device: DeviceSpec) -> bool:
    """Whether `device` runs the GPU executor (CUDA graphs, SDPA, static cache): every `gpu`."""
    return device.kind == "gpu"


def activation_of(device: DeviceSpec, activation: str) -> str:
    """The activation dtype on `device`: the GPU executor's bf16, else what the caller runs."""
    return ACTIVATION if graphed(device) else activation


def held_format(fmt: QuantFormat) -> QuantFormat:
    """A weight left as loaded (fp32 in the plan's terms) is held in the checkpoint's bf16 on a GPU."""
    return QuantFormat(dtype="bf16") if fmt.dtype == "fp32" else fmt


def kernel_family(fmt: QuantFormat, device: DeviceSpec) -> str:
    """The CUDA kernel family a weight of `fmt` runs on: fp8 needs fp8 units (sm89+: a peak fp8 rate
    above bf16's), else it is dequantized."""
    family = KERNEL_FAMILY[fmt.dtype]
    if family == "fp8_scaled_mm" and device.rate("fp8") <= device.rate("bf16"):
        return "dequantize"
    return family


def kernel(fmt: QuantFormat, device: DeviceSpec) -> KernelFigures:
    return KernelFigures(**figures()["families"][kernel_family(fmt, device)])


def half_dtype(device: DeviceSpec) -> str:
    """The half precision the card multiplies fastest: bf16, or fp16 where it has no bf16 units (T4)."""
    return "fp16" if device.rate("fp16") > device.rate("bf16") else "bf16"


def compute_rate(kernel_figures: KernelFigures, device: DeviceSpec, rows: int) -> float:
    """FLOP/s a product over `rows` activation rows reaches: the family's fraction of the dtype's peak,
    times rows / (rows + half_rows) (small row counts fill few tiles). Up to `gemv_rows` rows the
    kernels are matrix-vector products bound by their weight reads (infinite here: no compute term)."""
    if rows <= figures()["gemv_rows"]:
        return math.inf
    dtype = half_dtype(device) if kernel_figures.dtype == "bf16" else kernel_figures.dtype
    return device.rate(dtype) * kernel_figures.compute * rows / (rows + figures()["half_rows"])


def cache_positions(tokens: int) -> int:
    """Positions the static cache holds for `tokens` (context + generate): rounded up to
    `cache_multiple` (the executor's `lwdsl.runtime.serve.chunk.cache_tokens`)."""
    multiple = figures()["cache_multiple"]
    return -(-max(1, tokens) // multiple) * multiple


def decode_keys(cache: int, mean_position: float) -> float:
    """Keys a decode step's attention reads: the whole static cache (`decode_attention_reads` "cache":
    the captured graph's shapes are fixed and a mask hides the unwritten positions), or only the
    filled positions, on average `mean_position` + 1 ("filled": graphs captured per filled length)."""
    return float(cache) if figures()["decode_attention_reads"] == "cache" else mean_position + 1


def _shard(count: int, tensor_parallel: int) -> int:
    return -(-count // max(1, tensor_parallel))


def chunk_token_bytes(arch: ArchNumbers, batch: int, cache: int, tensor_parallel: int = 1) -> int:
    """Transient bytes each position of a prefill chunk adds on one rank: the hidden state, its norm,
    the attention output and the residual sum (4 · hidden, whole on every rank), q/k/v and the MLP's
    gate, up and product (split by the degree), for every sequence; one mask byte per cached position."""
    p = tensor_parallel
    values = (4 * arch.hidden + (_shard(arch.heads, p) + 2 * _shard(arch.kv_heads, p)) * arch.head_dim
              + 3 * _shard(arch.intermediate, p))
    return batch * values * ACTIVATION_BYTES + cache


def expanded_kv_bytes(arch: ArchNumbers, batch: int, cache: int, tensor_parallel: int = 1) -> int:
    """A prefill chunk's cached keys and values expanded to the query heads (one block at a time)."""
    return 2 * batch * _shard(arch.heads, tensor_parallel) * arch.head_dim * ACTIVATION_BYTES * cache


def prefill_chunk_tokens(arch: ArchNumbers, batch: int, context: int, generate: int, tensor_parallel: int = 1) -> int:
    """Positions a prefill chunk covers: as many multiples of `chunk_multiple` as fit the workspace
    beside the expanded keys/values, at least one multiple, at most the prompt (the executor's
    `lwdsl.runtime.serve.chunk.prefill_chunk_tokens`)."""
    f = figures()
    cache = cache_positions(context + generate)
    left = f["prefill_workspace_bytes"] - expanded_kv_bytes(arch, batch, cache, tensor_parallel)
    per_token = chunk_token_bytes(arch, batch, cache, tensor_parallel)
    multiple = f["chunk_multiple"]
    fits = max(multiple, left // per_token // multiple * multiple)
    return max(1, min(context, fits))


def prefill_chunks(arch: ArchNumbers, batch: int, context: int, generate: int, tensor_parallel: int = 1) -> int:
    """Chunks a prompt prefills in (each reads every weight once)."""
    return -(-max(1, context) // prefill_chunk_tokens(arch, batch, context, generate, tensor_parallel))


def linear_s(shape: tuple[int, int], nbytes: int, fmt: QuantFormat, rows: int, device: DeviceSpec,
             tensor_parallel: int = 1, decode: bool = True, reads: int = 1) -> float:
    """One linear over `rows` rows on one rank: the roofline at the family's achieved bandwidth and
    rate (a prefill reads the weights once per chunk: `reads`), plus, in a graphed decode step, the
    kernel's gap."""
    p = max(1, tensor_parallel)
    k = kernel(fmt, device)
    out_features, in_features = shape
    flops = 2.0 * rows * out_features * in_features / p
    moved = reads * nbytes / p + rows * (out_features + in_features) / p * ACTIVATION_BYTES
    bandwidth = device.bandwidth_Bps * k.bandwidth
    rate = compute_rate(k, device, rows)
    if bandwidth <= 0 or rate <= 0 or device.rate(k.dtype) <= 0:
        return math.inf
    return max(flops / rate, moved / bandwidth) + (figures()["kernel_gap_s"] if decode else 0.0)


def embedding_s(rows: int, hidden: int, device: DeviceSpec) -> float:
    """The embedding lookup: one row read and written per token."""
    return 2 * rows * hidden * ACTIVATION_BYTES / device.bandwidth_Bps if device.bandwidth_Bps > 0 else math.inf


def attention_s(arch: ArchNumbers, device: DeviceSpec, batch: int, queries: int, keys: float,
                kv_layer_bytes: int, tensor_parallel: int = 1) -> float:
    """One block's SDPA over `keys` cached positions for `queries` new ones (causal when both are the
    prompt: half the score tiles), reading the KV cache once and q/o once."""
    p = max(1, tensor_parallel)
    attention = figures()["attention"]
    causal = 0.5 if queries > 1 else 1.0
    flops = causal * 4.0 * batch * arch.heads * arch.head_dim * queries * keys / p
    moved = batch * (keys * kv_layer_bytes + 2 * queries * arch.heads * arch.head_dim * ACTIVATION_BYTES) / p
    rate = device.rate(half_dtype(device)) * attention["compute"]
    bandwidth = device.bandwidth_Bps * attention["bandwidth"]
    if rate <= 0 or bandwidth <= 0:
        return math.inf
    return max(flops / rate, moved / bandwidth)


def block_kernels_s() -> float:
    """A block's non-linear kernels' gaps in a graphed decode step (or a prefill chunk)."""
    f = figures()
    return f["kernels_per_block"]["other"] * f["kernel_gap_s"]


def step_fixed_s(decode: bool) -> float:
    """Per step (decode: the graph launch and the kernels outside the blocks) or per prefill."""
    f = figures()
    kernels = f["step_fixed_kernels"] * f["kernel_gap_s"]
    return f["graph_launch_s"] + kernels if decode else kernels


def allreduce_s(nbytes: float, ranks: int, link: LinkSpec | None) -> float:
    """One NCCL all-reduce of `nbytes` over `ranks` GPUs joined by `link`: the ring's bandwidth term
    2·(p−1)/p · bytes / rate, NCCL's fixed latency of a small all-reduce (`nccl_allreduce_base_s`)
    and 2·⌈log2 p⌉ hops of the link's latency (small messages go by a tree / one-shot exchange, not
    the ring's 2·(p−1) steps); the latency terms dominate at decode."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    if link is None or link.rate_Bps <= 0:
        return math.inf
    steps = ranks - 1
    return (figures()["nccl_allreduce_base_s"] + 2.0 * math.ceil(math.log2(ranks)) * link.latency_s
            + 2.0 * steps / ranks * nbytes / link.rate_Bps)


def activation_bytes(arch: ArchNumbers, batch: int, context: int, generate: int, tensor_parallel: int = 1) -> int:
    """Peak activation bytes on one rank: one prefill chunk's transient tensors (`chunk_token_bytes`
    per position, the expanded keys/values), at least one decode step's, plus the fp32 logits of the
    last position of each sequence (SDPA makes no score matrix)."""
    cache = cache_positions(context + generate)
    chunk = prefill_chunk_tokens(arch, batch, context, generate, tensor_parallel)
    prefill = chunk * chunk_token_bytes(arch, batch, cache, tensor_parallel) + \
        expanded_kv_bytes(arch, batch, cache, tensor_parallel)
    decode = chunk_token_bytes(arch, batch, cache, tensor_parallel)
    return max(prefill, decode) + 4 * batch * arch.vocab


def context_bytes(device: DeviceSpec) -> int:
    """What the CUDA runtime holds beside weights, cache and activations (context, cuBLAS workspaces,
    allocator slack); a probed figure wins."""
    return device.runtime_bytes or int(figures()["context_bytes"])

