"""What lwdsl's GPU executor costs on a `gpu` device. Pure; no torch.

The executor (apply/run on `cuda`) runs the checkpoint's half precision (bf16) throughout:
- attention through `scaled_dot_product_attention` (flash / memory-efficient kernels): no score
  matrix in memory; a prefill's live activations are O(tokens · hidden) of one block, for at most
  `prefill_chunk_tokens` tokens at once (longer prompts prefill in chunks);
- a static KV cache preallocated for batch × (context + generate) in the KV format; a decode step
  attends over the filled part of it;
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


def compute_rate(kernel_figures: KernelFigures, device: DeviceSpec, rows: int) -> float:
    """FLOP/s a product over `rows` activation rows reaches: the family's fraction of the dtype's peak,
    times rows / (rows + half_rows) (small row counts fill few tiles). Up to `gemv_rows` rows the
    kernels are matrix-vector products bound by their weight reads (infinite here: no compute term)."""
    if rows <= figures()["gemv_rows"]:
        return math.inf
    return device.rate(kernel_figures.dtype) * kernel_figures.compute * rows / (rows + figures()["half_rows"])


def chunks(tokens: int) -> int:
    """Prefill chunks a prompt batch of `tokens` runs in."""
    return max(1, math.ceil(tokens / figures()["prefill_chunk_tokens"]))


def linear_s(shape: tuple[int, int], nbytes: int, fmt: QuantFormat, rows: int, device: DeviceSpec,
             tensor_parallel: int = 1, decode: bool = True) -> float:
    """One linear over `rows` rows on one rank: the roofline at the family's achieved bandwidth and
    rate (weights read once per prefill chunk), plus, in a graphed decode step, the kernel's gap."""
    p = max(1, tensor_parallel)
    k = kernel(fmt, device)
    out_features, in_features = shape
    flops = 2.0 * rows * out_features * in_features / p
    reads = 1 if decode else chunks(rows)
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
    rate = device.rate(ACTIVATION) * attention["compute"]
    bandwidth = device.bandwidth_Bps * attention["bandwidth"]
    if rate <= 0 or bandwidth <= 0:
        return math.inf
    return max(flops / rate, moved / bandwidth)


def block_kernels_s(decode: bool, tokens: int = 1) -> float:
    """A block's non-linear kernels' gaps: in each graphed decode step, or in each prefill chunk."""
    f = figures()
    return f["kernels_per_block"]["other"] * f["kernel_gap_s"] * (1 if decode else chunks(tokens))


def step_fixed_s(decode: bool, tokens: int = 1) -> float:
    """Per step (decode: the graph launch and the kernels outside the blocks) or per prefill."""
    f = figures()
    kernels = f["step_fixed_kernels"] * f["kernel_gap_s"]
    return f["graph_launch_s"] + kernels if decode else kernels * chunks(tokens)


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


def live_width(arch: ArchNumbers, tensor_parallel: int = 1) -> float:
    """Values per token alive at once inside a block on one rank (SDPA makes no score matrix): the
    residual stream and its normed copy (whole on every rank), and the larger of q/k/v + the
    attention output, or the MLP's gate, up and their product (split by the degree)."""
    p = max(1, tensor_parallel)
    q_out, kv_out = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    mlp = 3 * arch.intermediate if arch.gated_mlp else 2 * arch.intermediate
    return 2 * arch.hidden + max(2 * q_out + 2 * kv_out, mlp) / p


def activation_bytes(arch: ArchNumbers, batch: int, context: int, tensor_parallel: int = 1) -> int:
    """Peak activation bytes on one rank: one prefill chunk's live block tensors (or one decode
    step's), plus the fp32 logits of the last position of each prompt (the head is split by the
    degree, its all-gathered logits are whole)."""
    tokens = min(batch * context, figures()["prefill_chunk_tokens"])
    tokens = max(tokens, batch)
    return math.ceil(ACTIVATION_BYTES * tokens * live_width(arch, tensor_parallel)) + 4 * batch * arch.vocab


def context_bytes(device: DeviceSpec) -> int:
    """What the CUDA runtime holds beside weights, cache and activations (context, cuBLAS workspaces,
    allocator slack); a probed figure wins."""
    return device.runtime_bytes or int(figures()["context_bytes"])

