"""Per-layer and per-block cost terms: the linear coefficients the solver uses and the summands of
`evaluate`, so that the solver's model and the estimate agree exactly. Pure; no torch.

Phases: a prefill pushes `batch · context` tokens through every layer once (the head: the last
position of each prompt), at the rates the probe measured a prefill's skinny matmuls, attention and
elementwise ops at for that many rows, plus the dequantization of int layers; a decode step pushes
`batch` tokens and attends over the cache at the mean position of the generated tokens,
`context + (generate − 1) / 2`, so that request time = prefill + generate · token time holds exactly.
"""
from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from lwdsl.ast import InferenceWorkload
from lwdsl.cost import formats, gpu, memory, quality, time
from lwdsl.hardware.records import LinkSpec, ResolvedTarget
from lwdsl.hardware.topology import ring_link
from lwdsl.inventory.records import ArchNumbers, Inventory, Weight
from lwdsl.solution import LayerChoice, PruneChoice, QuantFormat


# Eager ops one forward dispatches, counted with a TorchDispatchMode on transformers 5 (decode step,
# prefill): per decoder block and outside the blocks (embedding, rotary, final norm, head).
EAGER_OPS = {  # model_type: (decode per block, prefill per block, fixed)
    "llama": (55, 59, 27), "mistral": (55, 59, 27), "qwen2": (55, 59, 27), "gpt2": (39, 43, 15),
    # Gemma 3 in the lean loop (`LeanGemma`: q/k head norms, four norms a block, GELU): its counts over a
    # Llama block's in that loop (74 / 70 decode, 113 / 91 prefill, 11 / 10 fixed, int8 linears) times
    # the Llama figures
    "gemma3_text": (58, 74, 31),
}


KV_APPEND_COPIES = 2  # bytes of the cache moved per step to append one entry: read + write (torch.cat)

# The fused decode step (`lwdsl.runtime.fused`): a Llama-layout model's whole batch-1 step in one
# native call, when every linear is fp32, int8 per channel or int4 in groups of 32k, nothing streams
# from another device, the KV cache is float and the step is not sharded. Its figures are measured
# by the probe (`DeviceSpec.fused_*`); the torch ops left around each step are counted eagerly.
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma3_text"})
LEAN_MODEL_TYPES = FUSED_MODEL_TYPES  # the layouts `lwdsl.runtime.generate.LeanLlama` runs a prefill of
FUSED_EAGER_OPS = 4  # the embedding row, the next token's tensor, argmax and its read-back
# Layouts whose prefill computes the head for the last position only (the lean loop's).
LAST_ROW_MODEL_TYPES = LEAN_MODEL_TYPES
DEQUANT_ROWS = 16  # from this many rows lwdsl's native int kernels run the float matmul (apply/native.py)


def fused_family(fmt: QuantFormat, in_features: int, prune: PruneChoice | None = None) -> str | None:
    """The fused step's kernel family for a weight format (None: the step cannot compute it; a 2:4
    layer keeps its own packed module)."""
    if prune is not None and prune.kind == "2:4":
        return None
    if fmt.dtype == "fp32":
        return "fp32"
    if in_features % 32:
        return None
    if fmt.dtype == "int8" and fmt.group is None and fmt.symmetric:
        return "int8"
    if fmt.dtype == "int8" and fmt.group and fmt.group % 32 == 0 and fmt.symmetric:
        return "int8g"  # a scale per 32k inputs (group 32: GGUF's Q8_0)
    if fmt.dtype == "int4" and fmt.group and fmt.group % 32 == 0:
        return "int4"
    return None


def fuses(arch: ArchNumbers, device, workload: InferenceWorkload, kv_format: QuantFormat,
          tensor_parallel: int = 1) -> bool:
    """Whether decode steps on `device` can run fused at all (the layers' formats aside)."""
    return (device.kind == "cpu" and bool(device.fused_stream) and arch.model_type in FUSED_MODEL_TYPES
            and workload.batch == 1 and tensor_parallel <= 1 and kv_format.dtype == "fp32")


class Terms(BaseModel):
    """Bytes a piece of the model holds and the seconds it costs per phase."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight_bytes: int = 0  # on the weight's own device
    prefill_s: float = 0.0  # compute + transfers for one prefill
    token_s: float = 0.0  # compute + transfers for one decode step
    ppl_increase: float = 0.0
    kld: float = 0.0
    note: str | None = None


def phase_tokens(workload: InferenceWorkload) -> tuple[int, int]:
    """(tokens in one prefill, tokens in one decode step)."""
    return workload.batch * workload.context, workload.batch


def mean_decode_position(workload: InferenceWorkload) -> float:
    """Cached tokens a decode step attends over, averaged over the generated tokens."""
    return workload.context + (max(workload.generate, 1) - 1) / 2


def stream_link(target: ResolvedTarget, source: str, destination: str) -> LinkSpec | None:
    """The path weights stream over from where they live to where they compute: the routed path,
    no faster than the source memory itself reads (a disk's bandwidth caps its link)."""
    link = target.route(source, destination)
    if link is None:
        return None
    rate = min(link.rate_Bps, target.device(source).bandwidth_Bps)
    return link.model_copy(update={"rate_Bps": rate})


def fastest_dtype(device, fmt: QuantFormat, activation: str = "fp32") -> str:
    """The dtype a layer's matmul runs at on `device`: the format's own compute dtype, unless
    dequantizing to the activation dtype is faster there (fp16 on a CPU without half-precision
    units: the executor upcasts, as apply's CastLinear and its measured kernel dispatch do)."""
    native = formats.compute_dtype(fmt, activation)
    return native if device.rate(native) >= device.rate(activation) else activation


def prefill_rows(weight: Weight, arch: ArchNumbers, workload: InferenceWorkload) -> int:
    """Activation rows a weight's matmul takes in one prefill: every prompt token, except the head's,
    which the executor computes for the last position of each prompt only (the lean loop slices the
    last row before the head; batches go through the Hugging Face forward with `logits_to_keep=1`).
    A model of another layout at batch 1 runs the Hugging Face forward whole: logits for every token."""
    if weight.role == "head" and (arch.model_type in LAST_ROW_MODEL_TYPES or workload.batch > 1):
        return workload.batch
    return workload.batch * workload.context


def dequant_s(shape: tuple[int, int], family: str, device) -> float:
    """Seconds to write a layer's transient float32 matrix from its int codes before a prefill's float
    matmul, at the probe's measured rate (0 where it measured none)."""
    rate = device.dequant_Bps.get(family, 0.0)
    return shape[0] * shape[1] * 4 / rate if rate > 0 else 0.0


def elementwise_prefill_s(role: str, shape: tuple[int, int], arch: ArchNumbers, device,
                          workload: InferenceWorkload, tensor_parallel: int = 1, activation: str = "fp32") -> float:
    """The eager elementwise ops of a prefill that consume this linear's output (rotary, the KV-cache
    write, residual adds and norms, SiLU and the gated product: `time.LEAN_ELEMENTWISE_VALUES`), at
    the bytes/s the probe measured them at for this many rows: the lean loop's layouts, a Llama block's
    count or the layout's own (`time.ELEMENTWISE_VALUES`: Gemma 3)."""
    table = time.ELEMENTWISE_VALUES.get(arch.model_type, time.LEAN_ELEMENTWISE_VALUES) \
        if arch.model_type in LEAN_MODEL_TYPES else {}
    values = table.get(role, 0)
    if not values:
        return 0.0
    rows = workload.batch * workload.context
    # tensor parallelism splits the heads and the MLP's channels; the residual stream is whole on each rank
    shards = 1 if role in ("attn_o", "mlp_down") else max(1, tensor_parallel)
    moved = rows * values * shape[0] / shards * memory.ACTIVATION_BYTES[activation]
    rate = device.elementwise_Bps(rows)
    return moved / rate if rate > 0 else math.inf


def effective_format(weight: Weight, choice: LayerChoice) -> tuple[QuantFormat, str | None]:
    """The format the layer really gets: a format that cannot apply leaves it as loaded, with a note."""
    reason = formats.format_applies(weight.shape, choice.format)
    if reason is None:
        return (as_loaded(weight) if choice.format == QuantFormat() else choice.format), None
    return as_loaded(weight), f"{weight.module} left as it was: {reason}"


def as_loaded(weight: Weight) -> QuantFormat:
    """The format of a layer left as it is: the published checkpoint's dtype for an `arch:`/`config:`
    model (bf16 for Llama 3), fp32 for one whose weights lwdsl loads (it loads them as fp32)."""
    return QuantFormat(dtype=weight.checkpoint_dtype) if weight.checkpoint_dtype in ("bf16", "fp16") \
        else QuantFormat()


# Streamed blocks resident at once on their computing device: the one computing and the next, read
# ahead (`lwdsl.apply.offload.Streamer`). Its memory holds that many of the largest streamed block.
STREAM_UNITS_IN_FLIGHT = 2


def block_linear_numel(inventory: Inventory) -> dict[int, int]:
    """Each block's linear weights (as loaded), in values."""
    totals: dict[int, int] = {}
    for w in inventory.linear_layers():
        if w.block is not None:
            totals[w.block] = totals.get(w.block, 0) + w.numel
    return totals


def stream_share(weight: Weight, block_numel: dict[int, int]) -> float:
    """The fraction of its block's linear weights that `weight` holds (`block_linear_numel`): its share
    of the block's own work (attention, per-op overhead) that a streamed block's reads overlap."""
    total = block_numel.get(weight.block, 0) if weight.is_linear else 0
    return weight.numel / total if total else 0.0


def block_own_terms(arch: ArchNumbers, compute_device: str, target: ResolvedTarget, workload: InferenceWorkload,
                    kv_format: QuantFormat, tensor_parallel: int = 1, activation: str = "fp32",
                    fused: bool = False, share: float = 1.0, layer: int | None = None) -> Terms:
    """A block's work besides its linears, attention and the per-op overhead, per phase (· `share`)."""
    attention = attention_terms(arch, compute_device, target, workload, kv_format, tensor_parallel, activation, fused,
                                layer)
    overhead = overhead_terms(arch, compute_device, target, fused=fused)
    return Terms(prefill_s=share * (attention.prefill_s + overhead.prefill_s),
                 token_s=share * (attention.token_s + overhead.token_s))


def overlapped_read_s(compute_s: float, read_s: float, block_share_s: float) -> float:
    """A streamed layer's seconds beyond its compute: the streamer reads the next block on a thread of
    its own while this one computes (`lwdsl.apply.offload.Streamer`), so a block takes the longer of
    its work and its read. Per layer: the read against the layer's compute plus its share of the
    block's own work (counted apart, in the block's terms); what the work does not hide is added."""
    return max(0.0, read_s - compute_s - block_share_s)


def layer_terms(weight: Weight, choice: LayerChoice, inventory: Inventory, target: ResolvedTarget,
                workload: InferenceWorkload, tensor_parallel: int = 1, activation: str = "fp32",
                total_linear_numel: int | None = None, shared: bool = False, fused: bool = False,
                own_share: Terms | None = None) -> Terms:
    """Bytes, prefill and decode seconds, and the quality prior of one linear (or embedding) weight.

    `fused`: decode steps run fused (see `fuses`); a linear the step computes then streams at the
    probe's measured rate for its family and width instead of the eager roofline.

    Prefill: the roofline at the probe's matmul rate for the layer's rows (`prefill_rows`), plus the
    dequantization of an int layer the native kernels multiply as float, plus the elementwise ops that
    consume the layer's output (`elementwise_prefill_s`).

    `shared`: a tied weight (`lm_head` of a tied model) whose choice equals its partner's (same
    format, prune and device) holds no bytes of its own; with any other choice it is a second copy.
    Its time is always counted: the head's matmul reads the whole matrix every step.

    A layer stored off its computing device streams: its read overlaps its compute and `own_share`,
    its share of its block's attention and overhead (`block_own_terms` · `stream_share`), and only
    what they do not hide is added (`overlapped_read_s`).
    """
    arch = inventory.arch
    compute = target.device(choice.compute_device)
    fmt, note = effective_format(weight, choice)
    chosen = fmt  # what the plan chose, for the quality prior (as loaded loses nothing)
    if gpu.graphed(compute):  # the GPU executor holds a weight left as loaded in the checkpoint's bf16
        fmt, activation = gpu.held_format(fmt), gpu.activation_of(compute, activation)
    if note is None and choice.prune.kind == "unstructured" and choice.prune.fraction > 0:
        note = f"{weight.module}: {formats.UNSTRUCTURED_NOTE}"
    shape = formats.pruned_shape(weight.shape, weight.role, choice.prune, arch.head_dim)
    nbytes = formats.weight_bytes(weight.shape, fmt, choice.prune, weight.role, arch.head_dim)
    stored = 0 if shared else nbytes
    if total_linear_numel is None:
        total_linear_numel = sum(w.numel for w in inventory.linear_layers())
    lossless = QuantFormat() if chosen == as_loaded(weight) else chosen  # the checkpoint's own dtype loses nothing
    ppl, kld = quality.layer_quality(weight.numel, total_linear_numel, weight.shape[-1], lossless, choice.prune) \
        if weight.is_linear else (0.0, 0.0)
    act_bytes = memory.ACTIVATION_BYTES[activation]
    p = max(1, tensor_parallel)
    seconds = []
    for phase, tokens in enumerate(phase_tokens(workload)):
        if gpu.graphed(compute):
            rows = prefill_rows(weight, arch, workload) if phase == 0 else tokens
            reads = gpu.prefill_chunks(arch, workload.batch, workload.context, workload.generate, p) \
                if phase == 0 else 1
            work = gpu.embedding_s(tokens, shape[-1], compute) if weight.role == "embedding" else \
                gpu.linear_s(shape, nbytes, fmt, rows, compute, p, decode=phase == 1, reads=reads)
            if phase == 0 and weight.role != "embedding":
                work += elementwise_prefill_s(weight.role, shape, arch, compute, workload, p, activation)
        elif weight.role == "embedding":  # a lookup: one row read per token
            work = time.roofline_s(0.0, tokens * shape[-1] * act_bytes, compute, activation)
        else:
            rows = prefill_rows(weight, arch, workload) if phase == 0 else tokens
            flops = time.linear_flops(rows, shape) / p
            # weight bytes stream at the rate rows of this many values achieve on the device (measured
            # on fp32 rows by the probe; a packed format is assumed to keep the same fraction)
            efficiency = compute.stream_efficiency(shape[1] * 4)
            moved = nbytes / p / efficiency + rows * (shape[0] + shape[1]) * act_bytes
            dtype = fastest_dtype(compute, fmt, activation)
            dequant = 0.0
            family = fused_family(fmt, shape[1], choice.prune)
            if phase == 0 and rows >= DEQUANT_ROWS and compute.fused_stream and family in ("int8", "int4"):
                dtype = activation  # lwdsl's native kernels dequantize a layer and use the float matmul
                dequant = dequant_s(shape, family, compute) / p
            rate = compute.prefill_matmul_rate(dtype, rows) if phase == 0 else None
            if phase == 0 and dequant:  # the native int prefill: the dtype the probe found faster here,
                rate = compute.prefill_int_matmul_rate(rows, arch.hidden)  # its activations' conversions apart
                dequant += compute.prefill_int_convert_s(rows, shape[0], shape[1]) / p
            work = time.roofline_s(flops, moved, compute, dtype, rate=rate) + dequant
            if phase == 0:
                work += elementwise_prefill_s(weight.role, shape, arch, compute, workload, p, activation)
        # a decode row streams at the fused step's measured rate: inside the step, or outside it (an
        # eager step: the native int layers run the step's row kernels, `native.linear_row`; torch's
        # float32 matrix-vector product read 27.8 GB/s where the step's fp32 rows read 28.0-28.8)
        family = fused_family(fmt, shape[1], choice.prune) if weight.role != "embedding" else None
        if phase == 1 and family and (fused or tokens == 1) and compute.fused_rate(family, shape[1]) > 0 \
                and choice.device == choice.compute_device:
            work = nbytes / p / compute.fused_rate(family, shape[1])
        if choice.device != choice.compute_device and weight.role != "embedding":
            read = time.transfer_s(nbytes / p, stream_link(target, choice.device, choice.compute_device))
            own = (own_share.prefill_s, own_share.token_s)[phase] if own_share is not None else 0.0
            work += overlapped_read_s(work, read, own)
        seconds.append(work)
    return Terms(weight_bytes=math.ceil(stored / p), prefill_s=seconds[0], token_s=seconds[1],
                 ppl_increase=ppl, kld=kld, note=note)


def attention_terms(arch: ArchNumbers, compute_device: str, target: ResolvedTarget,
                    workload: InferenceWorkload, kv_format: QuantFormat, tensor_parallel: int = 1,
                    activation: str = "fp32", fused: bool = False, layer: int | None = None) -> Terms:
    """One block's attention core (scores and weighted sum over the cache) and its KV reads/writes;
    `weight_bytes` here is the block's KV cache for the whole request. Fused steps write one entry
    into a preallocated cache and read it once. A sliding-window layer (`layer` in
    `arch.sliding_layers`) keeps and attends over the last `arch.sliding_window` tokens only."""
    device = target.device(compute_device)
    p = max(1, tensor_parallel)
    kv_layer = memory.kv_bytes_per_token_layer(arch, kv_format)
    b, c = workload.batch, workload.context
    at = -1 if layer is None else layer
    position = arch.attended(at, mean_decode_position(workload))
    if gpu.graphed(device):  # SDPA over a static cache: no scores in memory
        kv_layer = memory.kv_bytes_per_token_layer(arch, gpu.held_format(kv_format))
        positions = gpu.cache_positions(c + workload.generate)
        return Terms(weight_bytes=math.ceil(b * positions * kv_layer / p),
                     prefill_s=gpu.attention_s(arch, device, b, c, c, kv_layer, p),
                     token_s=gpu.attention_s(arch, device, b, 1, gpu.decode_keys(positions, position), kv_layer, p))
    act_bytes = memory.ACTIVATION_BYTES[activation]
    prefill_flops = time.attention_flops(b, arch.heads, arch.head_dim, c, c) / p
    prefill_bytes = (b * c * kv_layer + 2 * b * arch.heads * c * c * act_bytes) / p
    prefill_rate = device.prefill_attention_rate(activation, c)
    if device.prefill_attention:  # measured: torch's SDPA (flash on CPU), which never writes the scores
        prefill_bytes = b * c * kv_layer / p
        if arch.model_type in LEAN_MODEL_TYPES and activation == "fp32":  # lwdsl's own prefill: its dtype
            prefill_rate = device.prefill_run_attention_rate(c)
    token_flops = time.attention_flops(b, arch.heads, arch.head_dim, 1, position) / p
    # read the cache for attention, and copy it once more to append (transformers' DynamicCache
    # grows by torch.cat: the whole cache is read and written every step)
    token_bytes = (1 + (0 if fused else KV_APPEND_COPIES)) * b * (position + 1) * kv_layer / p
    return Terms(
        weight_bytes=math.ceil(b * arch.kv_tokens(at, c + workload.generate) * kv_layer / p),
        prefill_s=time.roofline_s(prefill_flops, prefill_bytes, device, activation,
                                  rate=prefill_rate),
        token_s=time.roofline_s(token_flops, token_bytes, device, activation),
    )


def collective_terms(arch: ArchNumbers, group: list[str], target: ResolvedTarget,
                     workload: InferenceWorkload, activation: str = "fp32") -> Terms:
    """Tensor parallelism's two all-reduces a block (after attention and after the MLP: Megatron-LM,
    Shoeybi et al. 2019, §3) of tokens · hidden activations, as a ring over the paths joining the group
    (`lwdsl.hardware.topology.ring_link`: the best ring's slowest step)."""
    if len(group) <= 1:
        return Terms()
    link = ring_link(group, target)  # the best ring over the routes joining the group (hardware/topology.py)
    on_gpus = all(gpu.graphed(target.device(d)) for d in group)  # NCCL inside the graphed step
    allreduce = gpu.allreduce_s if on_gpus else time.allreduce_s
    act_bytes = memory.ACTIVATION_BYTES[gpu.ACTIVATION if on_gpus else activation]
    prefill, decode = phase_tokens(workload)
    return Terms(prefill_s=2 * allreduce(prefill * arch.hidden * act_bytes, len(group), link),
                 token_s=2 * allreduce(decode * arch.hidden * act_bytes, len(group), link))


def hop_terms(arch: ArchNumbers, source: str, destination: str, target: ResolvedTarget,
              workload: InferenceWorkload, activation: str = "fp32") -> Terms:
    """A pipeline hop: the hidden state of every token crosses from one stage's device to the next."""
    if source == destination:
        return Terms()
    act_bytes = memory.ACTIVATION_BYTES[gpu.activation_of(target.device(source), activation)]
    prefill, decode = phase_tokens(workload)
    link = target.route(source, destination)
    return Terms(prefill_s=time.transfer_s(prefill * arch.hidden * act_bytes, link),
                 token_s=time.transfer_s(decode * arch.hidden * act_bytes, link))


def overhead_terms(arch: ArchNumbers, compute_device: str, target: ResolvedTarget, per_block: bool = True,
                   fused: bool = False) -> Terms:
    """Fixed per-op cost of eager execution: ops · the device's `op_overhead_s` (dispatch and launch,
    paid however small the tensors: what dominates small-batch decode of small models). Per block, or
    (per_block=False) the ops outside the blocks. A fused decode step pays the probe's fixed seconds
    per block (its barriers) and per step, plus the few torch ops around it."""
    decode_ops, prefill_ops, fixed_ops = EAGER_OPS.get(arch.model_type, EAGER_OPS["llama"])
    device = target.device(compute_device)
    if gpu.graphed(device):  # a graphed decode step: one launch, the kernels' in-graph gaps
        if not per_block:
            return Terms(prefill_s=gpu.step_fixed_s(False), token_s=gpu.step_fixed_s(True))
        return Terms(prefill_s=gpu.block_kernels_s(), token_s=gpu.block_kernels_s())
    overhead = device.op_overhead_s
    # an eager step measured on a tiny model of its layout (`probe_eager`), else its ops counted
    eager_block_s, eager_step_s = device.eager_steps.get(arch.model_type, (decode_ops * overhead, fixed_ops * overhead))
    if not per_block:
        token = device.fused_step_s + FUSED_EAGER_OPS * overhead if fused else eager_step_s
        return Terms(prefill_s=fixed_ops * overhead, token_s=token)
    fused_block_s = device.fused_layout_block_s.get(arch.model_type, device.fused_block_s)
    return Terms(prefill_s=prefill_ops * overhead, token_s=fused_block_s if fused else eager_block_s)
